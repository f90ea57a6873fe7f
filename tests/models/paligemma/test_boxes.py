"""Box codec: exact token strings for hand-computed cases, round trips, and tolerant parsing."""

import numpy as np
import pytest

from pg_tune.data.boxes import coco_bbox_to_xyxy
from pg_tune.models.paligemma.boxes import (
    Detection,
    decode_box,
    encode_box,
    encode_objects,
    loc_bins,
    parse_detections,
)

SIZE = (640, 480)  # (width, height)


def test_encode_box_hand_computed():
    # ymin = 48/480 = 0.1 -> round(102.3) = 102; xmin = 64/640 = 0.1 -> 102;
    # ymax = 240/480 = 0.5 -> round(511.5) = 512 (half to even); xmax = 320/640 = 0.5 -> 512.
    assert encode_box([64, 48, 320, 240], SIZE) == "<loc0102><loc0102><loc0512><loc0512>"


def test_encode_box_asymmetric_hand_computed():
    # 100x200 image, box x 10..90, y 20..180:
    # ymin 20/200*1023 = 102.3 -> 102; xmin 10/100*1023 = 102.3 -> 102;
    # ymax 180/200*1023 = 920.7 -> 921; xmax 90/100*1023 = 920.7 -> 921. Order is y, x, y, x.
    assert encode_box([10, 20, 90, 180], (100, 200)) == "<loc0102><loc0102><loc0921><loc0921>"
    # y differs from x: box x 0..50, y 0..200 in a 100x200 image -> ymax 1023, xmax 511.5 -> 512.
    assert encode_box([0, 0, 50, 200], (100, 200)) == "<loc0000><loc0000><loc1023><loc0512>"


def test_binning_rounds_half_to_even_like_tf_round():
    # height 2046: y = 5 -> 5/2046*1023 = 2.5 exactly -> 2 (tf.round / Python round), not 3.
    assert loc_bins([0, 5, 0, 5], (10, 2046))[0] == 2
    assert loc_bins([0, 7, 0, 7], (10, 2046))[0] == 4  # 3.5 -> 4


def test_out_of_range_boxes_are_clipped():
    assert encode_box([-50, -10, 700, 500], SIZE) == "<loc0000><loc0000><loc1023><loc1023>"


def test_coco_bbox_to_xyxy():
    assert coco_bbox_to_xyxy([10, 20, 30, 40]) == (10.0, 20.0, 40.0, 60.0)
    with pytest.raises(ValueError, match="negative"):
        coco_bbox_to_xyxy([10, 20, -1, 40])


def test_encode_objects_joins_with_semicolons():
    text = encode_objects([("cat", [64, 48, 320, 240]), ("dog", [0, 0, 640, 480])], SIZE)
    assert text == "<loc0102><loc0102><loc0512><loc0512> cat ; <loc0000><loc0000><loc1023><loc1023> dog"


@pytest.mark.parametrize(
    "bad",
    [[1, 2, 3], [0, 0, float("nan"), 1], "abcd", None],
)
def test_bad_boxes_name_the_value(bad):
    with pytest.raises(ValueError, match="box must be"):
        encode_box(bad, SIZE)


@pytest.mark.parametrize("bad", [(0, 10), (10,), (-1, 5), None, (True, True)])
def test_bad_image_size_names_the_value(bad):
    with pytest.raises(ValueError, match="image_size"):
        encode_box([0, 0, 1, 1], bad)


@pytest.mark.parametrize("convert", [np.int64, np.int32, np.uint16, np.float32, np.float64])
def test_numpy_image_sizes_are_accepted(convert):
    # Sizes often come from numpy (an array's shape, a parquet column): same tokens as Python ints.
    size = (convert(640), convert(480))
    assert encode_box([64, 48, 320, 240], size) == encode_box([64, 48, 320, 240], SIZE)
    assert decode_box([0, 0, 1023, 1023], size) == (0.0, 0.0, 640.0, 480.0)
    assert (
        parse_detections("<loc0102><loc0102><loc0512><loc0512> cat", np.array([640, 480]))[0].label == "cat"
    )


def test_decode_box_uses_1023():
    assert decode_box([0, 0, 1023, 1023], SIZE) == (0.0, 0.0, 640.0, 480.0)
    x0, y0, x1, y1 = decode_box("<loc0102><loc0102><loc0512><loc0512>", SIZE)
    assert x0 == pytest.approx(102 / 1023 * 640)
    assert y1 == pytest.approx(512 / 1023 * 480)


def test_decode_box_sorts_swapped_coordinates():
    assert decode_box([512, 512, 102, 102], SIZE) == decode_box([102, 102, 512, 512], SIZE)


def test_decode_box_rejects_bad_bins():
    with pytest.raises(ValueError, match="1024"):
        decode_box([0, 0, 1024, 5], SIZE)


@pytest.mark.parametrize("size", [(640, 480), (224, 224), (1920, 1080), (37, 3001)])
def test_round_trip_within_one_bin(size):
    width, height = size
    boxes = [
        [0, 0, width, height],
        [width * 0.123, height * 0.456, width * 0.789, height * 0.987],
        [1.7, 2.2, 3.9, 5.5],
        [width * 0.5, height * 0.25, width * 0.5 + 1, height * 0.75],
    ]
    objects = [(f"thing {i}", b) for i, b in enumerate(boxes)]
    detections = parse_detections(encode_objects(objects, size), size)
    assert [d.label for d in detections] == [label for label, _ in objects]
    for det, (_, box) in zip(detections, objects, strict=True):
        tol = (width / 1023, height / 1023, width / 1023, height / 1023)
        for got, want, t in zip(det.box, box, tol, strict=True):
            assert abs(got - want) <= t + 1e-9


def test_parse_well_formed_detection():
    (det,) = parse_detections("<loc0102><loc0102><loc0512><loc0512> cat", SIZE)
    assert det.label == "cat"
    assert det.loc == (102, 102, 512, 512)
    assert det.seg is None
    assert det.box == decode_box([102, 102, 512, 512], SIZE)


def test_parse_missing_label_and_extra_spaces():
    text = "  <loc0001> <loc0002>  <loc0003><loc0004>   ;   <loc0010><loc0020><loc0030><loc0040>  big   red car  "
    dets = parse_detections(text, SIZE)
    assert [d.label for d in dets] == ["", "big red car"]
    assert [d.loc for d in dets] == [(1, 2, 3, 4), (10, 20, 30, 40)]


def test_parse_objects_without_separator():
    dets = parse_detections(
        "<loc0001><loc0002><loc0003><loc0004><loc0010><loc0020><loc0030><loc0040> b", SIZE
    )
    assert [(d.label, d.loc) for d in dets] == [("", (1, 2, 3, 4)), ("b", (10, 20, 30, 40))]


@pytest.mark.parametrize("tail", ["", "<loc0005>", "<loc0005><loc0006>", "<loc0005><loc0006><loc0007>"])
def test_parse_drops_truncated_trailing_group(tail):
    dets = parse_detections(f"<loc0001><loc0002><loc0003><loc0004> cat ; {tail}", SIZE)
    assert [(d.label, d.loc) for d in dets] == [("cat", (1, 2, 3, 4))]


def test_parse_dedupes_exact_duplicates_only():
    one = "<loc0001><loc0002><loc0003><loc0004> cat"
    other = "<loc0001><loc0002><loc0003><loc0005> cat"
    dets = parse_detections(" ; ".join([one, one, other, one]), SIZE)
    assert [d.loc for d in dets] == [(1, 2, 3, 4), (1, 2, 3, 5)]


def test_parse_ignores_eos_and_pad():
    dets = parse_detections("<loc0001><loc0002><loc0003><loc0004> cat<eos><pad><pad>", SIZE)
    assert [(d.label, d.loc) for d in dets] == [("cat", (1, 2, 3, 4))]


def test_parse_sorts_swapped_coordinates():
    (det,) = parse_detections("<loc0900><loc0800><loc0100><loc0200> cat", SIZE)
    assert det.loc == (100, 200, 900, 800)
    x0, y0, x1, y1 = det.box
    assert x0 < x1 and y0 < y1


def test_parse_segmentation_codes():
    segs = "".join(f"<seg{i:03d}>" for i in range(100, 116))
    text = (
        f"<loc0001><loc0002><loc0003><loc0004>{segs} cat ; <loc0001><loc0002><loc0003><loc0004> <seg001> dog"
    )
    dets = parse_detections(text, SIZE)
    assert dets[0] == Detection("cat", dets[0].box, (1, 2, 3, 4), tuple(range(100, 116)))
    assert dets[1].label == "dog" and dets[1].seg is None  # an incomplete code set is not kept


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "no tokens here",
        "<loc12><loc0001>",
        "<seg001>" * 16,
        ";;;",
        "<loc9999><loc0001><loc0002><loc0003> x",
        "<<<>>>",
        "<loc0001>" * 3,
        None,
        12345,
    ],
)
def test_parse_garbage_returns_empty(garbage):
    assert parse_detections(garbage, SIZE) == []


def test_parse_text_before_first_box_is_ignored():
    dets = parse_detections("detect cat\n<loc0001><loc0002><loc0003><loc0004> cat", SIZE)
    assert [d.label for d in dets] == ["cat"]


def test_box_codec_needs_no_torch():
    import subprocess
    import sys

    code = (
        "import sys, pg_tune.models.paligemma.boxes as c; c.encode_box([0, 0, 1, 1], (2, 2)); "
        "assert 'torch' not in sys.modules; assert all(hasattr(c, n) for n in c.__all__)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
