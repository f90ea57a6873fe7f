"""Mask codec: published weight layout, TF "SAME" padding, VQ lookup, crop/paste and the full pipeline.

No real vae-oid.npz here (no network): weights are random but in the published layout, so these
tests pin the plumbing (shapes, padding, ordering, file handling), not mask quality.
"""

import re
import socket
import urllib.error

import numpy as np
import pytest
import torch

from pg_tune.models.paligemma.boxes import encode_box
from pg_tune.models.paligemma.masks import (
    VAE_NUM_BYTES,
    MaskCodec,
    MaskCodecUnavailableError,
    conv2d_tf_same,
    crop_mask_to_64,
    make_random_vae_weights,
    nearest_codes,
    paste_mask_64,
    save_npz,
    tf_same_padding,
    vae_weight_shapes,
)

SIZE = (160, 120)  # (width, height)


@pytest.fixture(scope="module")
def weights():
    return make_random_vae_weights(seed=0)


@pytest.fixture(scope="module")
def codec_path(tmp_path_factory, weights):
    return save_npz(weights, tmp_path_factory.mktemp("vae") / "vae-oid.npz")


@pytest.fixture(scope="module")
def codec(codec_path):
    return MaskCodec.from_npz(codec_path)


def _ellipse(size=SIZE, center=(80, 60), radii=(50, 30)):
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width]
    return ((xx - center[0]) / radii[0]) ** 2 + ((yy - center[1]) / radii[1]) ** 2 <= 1.0


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


# -- weights and file layout ---------------------------------------------------------------------


def test_random_weights_reproduce_published_file_size(weights, codec_path):
    assert set(weights) == set(vae_weight_shapes())
    assert all(
        weights[k].shape == s and weights[k].dtype == np.float32 for k, s in vae_weight_shapes().items()
    )
    # Same keys, shapes and dtype as vae-oid.npz, saved the same way -> the same 8,479,556 bytes.
    assert codec_path.stat().st_size == VAE_NUM_BYTES


def test_weights_round_trip_through_npz(weights, codec):
    for key in vae_weight_shapes(include_ema=False):
        assert np.array_equal(codec.params[key].numpy(), weights[key]), key


def test_make_random_vae_weights_is_seeded():
    a, b, c = make_random_vae_weights(1), make_random_vae_weights(1), make_random_vae_weights(2)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["encoder.0.weight"], c["encoder.0.weight"])


def test_bad_weights_name_the_key(weights):
    broken = dict(weights)
    del broken["decoder.12.bias"]
    broken["encoder.0.weight"] = np.zeros((16, 1, 3, 3), np.float32)
    with pytest.raises(ValueError, match=r"decoder\.12\.bias.*encoder\.0\.weight: \(16, 1, 3, 3\)"):
        MaskCodec(broken)


# -- TF "SAME" padding ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, kernel, stride, expected",
    [
        (4, 3, 2, (0, 1)),
        (64, 3, 2, (0, 1)),
        (64, 4, 2, (1, 1)),
        (5, 3, 2, (1, 1)),
        (7, 4, 2, (1, 2)),
        (4, 1, 1, (0, 0)),
        (4, 3, 1, (1, 1)),
        (2, 5, 2, (1, 2)),
    ],
)
def test_tf_same_padding(size, kernel, stride, expected):
    assert tf_same_padding(size, kernel, stride) == expected


def test_conv2d_tf_same_hand_case():
    # 4x4 input 1..16, 3x3 ones kernel, stride 2. TF pads 0 before and 1 after, so the four outputs
    # sum rows/cols {0,1,2}x{0,1,2}, {0,1,2}x{2,3}, {2,3}x{0,1,2}, {2,3}x{2,3}:
    #   1+2+3+5+6+7+9+10+11 = 54, 3+4+7+8+11+12 = 45, 9+10+11+13+14+15 = 72, 11+12+15+16 = 54.
    # (PyTorch padding=1 would give 14 for the first one.)
    x = torch.arange(1.0, 17.0).reshape(1, 1, 4, 4)
    out = conv2d_tf_same(x, torch.ones(1, 1, 3, 3), None, stride=2)
    assert out[0, 0].tolist() == [[54.0, 45.0], [72.0, 54.0]]
    ones = conv2d_tf_same(torch.ones(1, 1, 4, 4), torch.ones(1, 1, 3, 3), None, stride=2)
    assert ones[0, 0].tolist() == [[9.0, 6.0], [6.0, 4.0]]


def test_tf_same_equals_torch_padding_1_for_4x4_stride_2_on_even_sizes():
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 3, 16, 16, generator=gen), torch.randn(5, 3, 4, 4, generator=gen)
    torch.testing.assert_close(
        conv2d_tf_same(x, w, None, 2), torch.nn.functional.conv2d(x, w, stride=2, padding=1)
    )


# -- the network against an independent NumPy reference of big_vision's code ----------------------


def _np_conv_same(x, w_oihw, b, stride):
    """NHWC conv with TF SAME padding, kernel transposed to HWIO as big_vision does."""
    k = w_oihw.transpose(2, 3, 1, 0).astype(np.float64)
    kh, kw = k.shape[:2]
    height, width = x.shape[:2]
    oh, ow = -(-height // stride), -(-width // stride)
    ph, pw = max((oh - 1) * stride + kh - height, 0), max((ow - 1) * stride + kw - width, 0)
    xp = np.pad(x, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    out = np.zeros((oh, ow, k.shape[3]))
    for i in range(kh):
        for j in range(kw):
            out += xp[i : i + stride * oh : stride, j : j + stride * ow : stride] @ k[i, j]
    return out + b


def _np_conv_transpose(x, w_iohw, b):
    """Stride-2, k=4, PyTorch padding=1 transposed conv: dilate, pad k-1-p=2, flipped kernel."""
    height, width, c_in = x.shape
    xd = np.zeros((2 * height - 1, 2 * width - 1, c_in))
    xd[::2, ::2] = x
    xp = np.pad(xd, ((2, 2), (2, 2), (0, 0)))
    k = w_iohw[:, :, ::-1, ::-1].astype(np.float64)
    out = np.zeros((2 * height, 2 * width, w_iohw.shape[1]))
    for i in range(4):
        for j in range(4):
            out += xp[i : i + 2 * height, j : j + 2 * width] @ k[:, :, i, j]
    return out + b


def _np_resblock(x, w, prefix):
    h = np.maximum(_np_conv_same(x, w[f"{prefix}.0.weight"], w[f"{prefix}.0.bias"], 1), 0)
    h = np.maximum(_np_conv_same(h, w[f"{prefix}.2.weight"], w[f"{prefix}.2.bias"], 1), 0)
    return x + _np_conv_same(h, w[f"{prefix}.4.weight"], w[f"{prefix}.4.bias"], 1)


def test_encoder_matches_numpy_reference(codec, weights):
    mask64 = crop_mask_to_64(_ellipse(), (30, 30, 130, 90))
    x = 2.0 * (mask64[:, :, None].astype(np.float64) - 0.5)
    for i in range(4):
        x = np.maximum(
            _np_conv_same(x, weights[f"encoder.{2 * i}.weight"], weights[f"encoder.{2 * i}.bias"], 2), 0
        )
    x = _np_resblock(_np_resblock(x, weights, "encoder.8.net"), weights, "encoder.9.net")
    x = _np_conv_same(x, weights["encoder.10.weight"], weights["encoder.10.bias"], 1)
    assert x.shape == (4, 4, 512)
    grid = codec.encode_grid(torch.from_numpy(mask64)[None])
    assert grid.shape == (1, 512, 4, 4)
    np.testing.assert_allclose(grid[0].permute(1, 2, 0).numpy(), x, rtol=1e-4, atol=1e-4)
    embedding = weights["_vq_vae._embedding"].astype(np.float64)
    flat = x.reshape(16, 512)  # row-major over the 4x4 grid
    expected = ((flat[:, None, :] - embedding[None]) ** 2).sum(-1).argmin(1)
    assert codec.encode_codes(mask64[None])[0].tolist() == expected.tolist()


def test_decoder_matches_numpy_reference(codec, weights):
    codes = np.arange(16) * 7 % 128
    x = weights["_vq_vae._embedding"][codes].reshape(4, 4, 512).astype(np.float64)
    x = np.maximum(_np_conv_same(x, weights["decoder.0.weight"], weights["decoder.0.bias"], 1), 0)
    x = _np_resblock(_np_resblock(x, weights, "decoder.2.net"), weights, "decoder.3.net")
    for layer in (4, 6, 8, 10):
        x = np.maximum(
            _np_conv_transpose(x, weights[f"decoder.{layer}.weight"], weights[f"decoder.{layer}.bias"]), 0
        )
    x = _np_conv_same(x, weights["decoder.12.weight"], weights["decoder.12.bias"], 1)[:, :, 0]
    out = codec.decode_codes(torch.from_numpy(codes)[None])
    assert out.shape == (1, 64, 64)
    np.testing.assert_allclose(out[0].numpy(), x, rtol=1e-4, atol=1e-4)


# -- vector quantisation -------------------------------------------------------------------------


def test_nearest_codes_is_l2_not_inner_product():
    embedding = torch.tensor([[1.0, 0.0], [10.0, 0.0], [0.0, -3.0]])
    vectors = torch.tensor([[2.0, 0.0], [7.0, 1.0], [0.5, -2.0]])
    # [2,0]: distances 1, 64, 13 -> 0 (largest inner product would pick 1).
    assert nearest_codes(vectors, embedding).tolist() == [0, 1, 2]


def test_nearest_codes_matches_brute_force_and_fixes_codebook_rows(weights):
    embedding = torch.from_numpy(weights["_vq_vae._embedding"])
    assert nearest_codes(embedding, embedding).tolist() == list(range(128))
    vectors = torch.randn(300, 512, generator=torch.Generator().manual_seed(3))
    assert torch.equal(nearest_codes(vectors, embedding), torch.cdist(vectors, embedding).argmin(1))


# -- crop / resize / paste (the VAE skipped) -----------------------------------------------------


@pytest.mark.parametrize(
    "mask, box",
    [
        (np.pad(np.ones((50, 70), bool), ((20, 50), (30, 60))), (30, 20, 100, 70)),
        (_ellipse(), (30, 30, 130, 90)),
        (_ellipse(center=(20, 100), radii=(12, 8)), (8, 92, 32, 108)),
    ],
)
def test_crop_resize_paste_round_trips(mask, box):
    mask64 = crop_mask_to_64(mask, box)
    assert mask64.shape == (64, 64) and mask64.min() >= 0.0 and mask64.max() <= 1.0
    back = paste_mask_64(2.0 * (mask64 - 0.5), box, SIZE)  # what a perfect VAE would give
    assert back.dtype == np.bool_ and back.shape == mask.shape
    assert _iou(back, mask) > 0.9


def test_paste_truncates_box_corners_like_big_vision():
    pasted = paste_mask_64(np.ones((64, 64)), (10.7, 20.2, 50.9, 60.99), SIZE)
    expected = np.zeros((120, 160), bool)
    expected[20:60, 10:50] = True
    assert np.array_equal(pasted, expected)


def test_paste_of_empty_box_is_empty():
    assert not paste_mask_64(np.ones((64, 64)), (50, 50, 50.5, 80), SIZE).any()


def test_crop_accepts_uint8_and_rejects_bad_masks():
    assert crop_mask_to_64(np.full((10, 10), 255, np.uint8), (0, 0, 10, 10)).min() == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        crop_mask_to_64(np.full((10, 10), 3.0), (0, 0, 10, 10))
    with pytest.raises(ValueError, match="covers no pixels"):
        crop_mask_to_64(np.ones((10, 10), bool), (4, 4, 4.2, 9))


# -- the full pipeline with random weights --------------------------------------------------------


def test_encode_decode_is_deterministic_and_stays_in_the_box(codec, codec_path):
    mask, box = _ellipse(), (30, 30, 130, 90)
    codes = codec.encode_mask(mask, box, SIZE)
    assert len(codes) == 16 and all(isinstance(c, int) and 0 <= c < 128 for c in codes)
    assert MaskCodec.from_npz(codec_path).encode_mask(mask, box, SIZE) == codes
    decoded = codec.decode_mask(codes, box, SIZE)
    assert decoded.dtype == np.bool_ and decoded.shape == (120, 160)
    assert np.array_equal(codec.decode_mask(codes, box, SIZE), decoded)
    outside = np.ones_like(decoded)
    outside[30:90, 30:130] = False
    assert not decoded[outside].any()


def test_encode_codes_batches_like_single_masks(codec):
    masks = np.stack([crop_mask_to_64(_ellipse(), (30, 30, 130, 90)), np.zeros((64, 64), np.float32)])
    batch = codec.encode_codes(masks)
    assert batch.shape == (2, 16)
    assert batch[1].tolist() == codec.encode_codes(masks[1:])[0].tolist()


def test_codec_input_validation(codec):
    with pytest.raises(ValueError, match=r"\[0, 127\]"):
        codec.decode_mask([0] * 15 + [128], (0, 0, 10, 10), SIZE)
    with pytest.raises(ValueError, match=r"\(B, 16\)"):
        codec.decode_mask([0] * 15, (0, 0, 10, 10), SIZE)
    with pytest.raises(ValueError, match="does not match image_size"):
        codec.encode_mask(np.ones((10, 10), bool), (0, 0, 5, 5), SIZE)
    with pytest.raises(ValueError, match=r"\(B, 64, 64\)"):
        codec.encode_codes(np.zeros((1, 32, 32)))


def test_encode_segment_and_parse_segment(codec):
    mask, box = _ellipse(), (30, 30, 130, 90)
    text = codec.encode_segment(mask, box, SIZE)
    assert re.fullmatch(r"(<loc\d{4}>){4}(<seg\d{3}>){16}", text)
    assert text.startswith(encode_box(box, SIZE))
    codes = codec.encode_mask(mask, box, SIZE)
    ((detection, decoded), (plain, no_mask)) = codec.parse_segment(
        f"{text} ellipse ; <loc0001><loc0002><loc0500><loc0600> box<eos>", SIZE
    )
    assert detection.label == "ellipse" and list(detection.seg) == codes
    assert np.array_equal(decoded, codec.decode_mask(codes, detection.box, SIZE))
    assert plain.label == "box" and no_mask is None
    assert codec.parse_segment("garbage <seg001>", SIZE) == []


# -- loading and the download fallback (never leaves loopback) ------------------------------------


def _refuse(url, destination):
    raise urllib.error.URLError("no network in tests")


def test_load_existing_path_needs_no_download(codec_path, tmp_path):
    codec = MaskCodec.load(codec_path, cache_dir=tmp_path, download=_refuse)
    assert set(codec.params) == set(vae_weight_shapes(include_ema=False))


def test_load_without_network_says_how_to_fix(tmp_path):
    missing = tmp_path / "nowhere" / "vae-oid.npz"
    with pytest.raises(MaskCodecUnavailableError, match="manually") as info:
        MaskCodec.load(missing, cache_dir=tmp_path / "cache", download=_refuse)
    assert str(missing) in str(info.value) and "MaskCodec.load(" in str(info.value)
    assert list((tmp_path / "cache").iterdir()) == []  # no partial file left behind


def test_load_with_unreachable_loopback_url(tmp_path):
    with socket.socket() as s:  # a loopback port with nothing listening: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(MaskCodecUnavailableError, match="could not download"):
        MaskCodec.load(cache_dir=tmp_path, url=f"http://127.0.0.1:{port}/vae-oid.npz")


def test_download_is_verified_then_cached(codec_path, tmp_path):
    import hashlib

    payload = codec_path.read_bytes()
    digest = hashlib.sha256(payload).hexdigest()
    calls = []

    def fake_download(url, destination):
        calls.append(url)
        destination.write_bytes(payload)

    kwargs = dict(cache_dir=tmp_path, sha256=digest, num_bytes=len(payload))
    MaskCodec.load(download=fake_download, **kwargs)
    assert (tmp_path / "vae-oid.npz").read_bytes() == payload and len(calls) == 1
    MaskCodec.load(download=_refuse, **kwargs)  # served from the cache
    assert len(calls) == 1


def test_corrupt_download_is_rejected(tmp_path):
    def bad_download(url, destination):
        destination.write_bytes(b"not the weights")

    with pytest.raises(ValueError, match="corrupt.*15 bytes"):
        MaskCodec.load(cache_dir=tmp_path, download=bad_download)
    assert list(tmp_path.iterdir()) == []


def test_wrong_file_in_cache_is_not_used(codec_path, tmp_path):
    (tmp_path / "vae-oid.npz").write_bytes(codec_path.read_bytes())  # random weights, not the real file
    with pytest.raises(ValueError, match="delete it"):
        MaskCodec.load(cache_dir=tmp_path, download=_refuse)
