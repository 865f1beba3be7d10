"""ControlNet preprocessors and control images: modules against OpenCV and their definitions, resize modes
by where pixels land, pixel perfect and the module list against the values in sd-webui-controlnet's source."""

import math

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from backend import control_maps
from backend import control_preprocessors as cp
from backend.errors import InputError

GREY, YELLOW, CYAN = (128, 128, 128), (255, 255, 0), (0, 255, 255)


def scene(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A photo-like RGB image: smooth colour noise, a dark circle, a light diagonal."""
    rng = np.random.default_rng(seed)
    coarse = (rng.random((height // 8 + 1, width // 8 + 1, 3)) * 255).astype(np.uint8)
    image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    cv2.circle(image, (width // 3, height // 2), min(height, width) // 4, (20, 30, 40), 3)
    cv2.line(image, (0, 0), (width - 1, height - 1), (250, 250, 250), 2)
    return image


def filled(colour, height: int = 64, width: int = 64) -> np.ndarray:
    return np.full((height, width, 3), colour, np.uint8)


def markers() -> np.ndarray:
    """32 rows x 64 columns of grey, column 16 yellow, column 47 cyan: three colours, so maps of it are
    resized by nearest neighbour and every pixel's source can be told."""
    image = filled(GREY, 32, 64)
    image[:, 16], image[:, 47] = YELLOW, CYAN
    return image


def as_uint8(tensor: torch.Tensor) -> np.ndarray:
    return np.round(tensor.permute(1, 2, 0).numpy() * 255).astype(np.uint8)


# ---- modules --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("low, high", [(100, 200), (50, 100), (1, 255), (200, 250), (30.7, 90.2)])
def test_canny_equals_opencv_on_the_resized_image(low, high):
    image = scene(100, 150)  # at 128 the short side scales by 1.28 to 192x128: multiples of 64, no padding
    expected = cv2.Canny(cv2.resize(image, (192, 128), interpolation=cv2.INTER_CUBIC), int(low), int(high))
    detected = cp.detect_map("canny", Image.fromarray(image), 128, low, high)
    assert detected.shape == (128, 192, 3)
    assert np.array_equal(detected, np.repeat(expected[:, :, None], 3, axis=2))


def test_canny_runs_on_the_image_edge_padded_to_multiples_of_64_and_defaults_to_100_200_at_512():
    image = scene(100, 150)
    padded = np.pad(image, [(0, 28), (0, 42), (0, 0)], mode="edge")  # 100x150 -> 128x192
    expected = cv2.Canny(padded, 60, 120)[:100, :150]
    assert np.array_equal(cp.detect_map("canny", Image.fromarray(image), 100, 60, 120)[:, :, 0], expected)
    resized = cv2.resize(image, (768, 512), interpolation=cv2.INTER_CUBIC)
    assert np.array_equal(cp.detect_map("canny", Image.fromarray(image))[:, :, 1], cv2.Canny(resized, 100, 200))


@pytest.mark.parametrize("module, threshold, colour, expected", [
    ("invert", -1, (10, 200, 255), (245, 55, 0)),
    ("invert", -1, (0, 0, 0), (255, 255, 255)),
    ("threshold", 127, (128, 200, 255), (255, 255, 255)),  # every channel above the threshold
    ("threshold", 127, (127, 255, 255), (0, 0, 0)),  # the darkest channel decides; equal is not above
    ("threshold", 0, (1, 1, 1), (255, 255, 255)),
    ("threshold", 254.5, (255, 255, 255), (255, 255, 255)),
    ("lineart_standard", -1, (90, 90, 90), (0, 0, 0)),  # no lines in a flat image
    ("scribble_xdog", -1, (90, 90, 90), (0, 0, 0)),
])
def test_pixel_definitions(module, threshold, colour, expected):
    detected = cp.detect_map(module, Image.fromarray(filled(colour)), 64, threshold)
    assert detected.shape == (64, 64, 3)
    assert (detected == np.array(expected, np.uint8)).all()


def test_transparent_pixels_read_as_white():
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[:, 32:, 3] = 128  # half-covered black: 255 * (1 - 128/255) in float32 is 126.99998, truncated
    detected = cp.detect_map("invert", Image.fromarray(rgba, "RGBA"))
    assert (detected[:, :32] == 0).all() and (detected[:, 32:] == 255 - 126).all()


def test_lineart_standard_normalises_the_median_line_to_127():
    image = filled((255, 255, 255), 512, 512)
    cv2.line(image, (100, 50), (400, 450), (0, 0, 0), 3)
    x = image.astype(np.float32)
    darkness = np.min(cv2.GaussianBlur(x, (0, 0), 6.0) - x, axis=2).clip(0, 255)
    expected = (darkness / np.median(darkness[darkness > 8]) * 127).clip(0, 255).astype(np.uint8)
    detected = cp.detect_map("lineart_standard", Image.fromarray(image), 512)[:, :, 0]
    assert np.array_equal(detected, expected)
    assert np.median(detected[darkness > 8]) == 127 and detected[450, 50] == 0


def test_scribble_xdog_marks_a_thin_dark_line():
    image = filled((255, 255, 255), 128, 128)
    image[:, 64] = 0
    detected = cp.detect_map("scribble_xdog", Image.fromarray(image), 128)[:, :, 0]
    assert (detected[:, 64] == 255).all() and (detected[:, :50] == 0).all() and (detected[:, 80:] == 0).all()


def test_blur_gaussian_equals_opencv_on_the_resized_image():
    image = scene(64, 64)
    expected = cv2.GaussianBlur(cv2.resize(image, (96, 96), interpolation=cv2.INTER_CUBIC), (0, 0), 2.5)
    assert np.array_equal(cp.detect_map("blur_gaussian", Image.fromarray(image), 96, 2.5), expected)


@pytest.mark.parametrize("rate, size", [(1.0, (100, 60)), (1.05, (100, 60)), (2.0, (50, 30)), (3.0, (33, 20))])
def test_tile_resample_downsamples_by_the_rate_from_1_1(rate, size):
    image = scene(60, 100)
    expected = image if rate < 1.1 else cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    assert np.array_equal(cp.detect_map("tile_resample", Image.fromarray(image), -1, rate), expected)


def test_shuffle_is_reproducible_by_seed_and_runs_at_512():
    image = Image.fromarray(scene(100, 150))
    first = cp.detect_map("shuffle", image, 64, seed=7)  # shuffle has no resolution slider: 512 it is
    assert first.shape == (512, 768, 3)
    assert np.array_equal(first, cp.detect_map("shuffle", image, seed=7))
    assert not np.array_equal(first, cp.detect_map("shuffle", image, seed=8))
    flat = cp.detect_map("shuffle", Image.fromarray(filled((30, 60, 90))), seed=7)
    assert (flat == (30, 60, 90)).all()  # every pixel is fetched from inside the image


def test_color_grid_averages_64_pixel_cells():
    image = filled((200, 0, 0), 128, 128)
    image[:64, 64:], image[64:, :64], image[64:, 64:] = (0, 200, 0), (0, 0, 200), (90, 90, 90)
    detected = cp.detect_map("t2ia_color_grid", Image.fromarray(image), 128)
    assert np.array_equal(detected, image)


def test_inpaint_shows_the_mask_half_transparent_and_marks_masked_pixels_minus_one():
    image, mask = scene(64, 64), np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    shown = cp.run_preprocessor("inpaint_only", Image.fromarray(image), mask=Image.fromarray(mask))
    assert shown.mode == "RGBA" and np.array_equal(np.asarray(shown)[:, :, :3], image)
    assert set(np.unique(np.asarray(shown)[:, :, 3]).tolist()) == {255, 128}
    cond = cp.prepare_control_image(Image.fromarray(image), "inpaint_global_harmonious", (64, 64),
                                    mask=Image.fromarray(mask))
    assert (cond[:, 16:48, 16:48] == -1).all()
    assert torch.allclose(cond[:, :16], torch.from_numpy(image[:16]).permute(2, 0, 1).float() / 255)
    with pytest.raises(InputError, match="needs a mask"):
        cp.run_preprocessor("inpaint", Image.fromarray(image))
    with pytest.raises(InputError, match="32x32 but its image is 64x64"):
        cp.run_preprocessor("inpaint", Image.fromarray(image), mask=Image.new("L", (32, 32)))


def test_a_module_that_needs_weights_gets_them(monkeypatch):
    depth = cp.Module("depth_test", lambda inp: inp.weights(inp.image), needs_weights=True)
    monkeypatch.setitem(cp.MODULES, "depth_test", depth)
    image = Image.fromarray(filled((10, 20, 30)))
    with pytest.raises(InputError, match="needs its preprocessor model"):
        cp.run_preprocessor("depth_test", image)
    assert cp.run_preprocessor("depth_test", image, weights=lambda x: 255 - x).getpixel((0, 0)) == (245, 235, 225)


# ---- resize modes, pixel perfect --------------------------------------------------------------------------

# (mode, (width, height), output columns showing yellow, output columns showing cyan, rows holding the image)
GEOMETRY = [
    ("Just Resize", (64, 64), [16], [47], (0, 64)),  # rows doubled, columns kept
    ("Crop and Resize", (64, 64), [0, 1], [62, 63], (0, 64)),  # 2x to 128x64, columns 32-95 kept
    ("Resize and Fill", (64, 64), [16], [47], (16, 48)),  # as is, 16 rows of fill above and below
    ("Crop and Resize", (128, 64), [32, 33], [94, 95], (0, 64)),  # same aspect: all modes scale 2x
    ("Resize and Fill", (128, 64), [32, 33], [94, 95], (0, 64)),
    ("Crop and Resize", (64, 128), [], [], (0, 128)),  # 4x to 256x128, columns 96-159 (source 24-39)
    ("Resize and Fill", (64, 128), [16], [47], (48, 80)),
    ("Just Resize", (96, 48), [24, 25], [71], (0, 48)),  # nearest: output column c shows source c * 64 // 96
]


@pytest.mark.parametrize("mode, size, yellow, cyan, rows", GEOMETRY)
def test_resize_mode_geometry(mode, size, yellow, cyan, rows):
    fitted = as_uint8(cp.prepare_control_image(Image.fromarray(markers()), "none", size, mode))
    assert fitted.shape == (size[1], size[0], 3)
    columns = {c: tuple(fitted[rows[0], c]) for c in range(size[0])}
    assert [c for c, v in columns.items() if v == YELLOW] == yellow
    assert [c for c, v in columns.items() if v == CYAN] == cyan
    assert (fitted[rows[0]:rows[1]] == fitted[rows[0]]).all()  # the image: every row alike
    assert (fitted[:rows[0]] == GREY).all() and (fitted[rows[1]:] == GREY).all()  # the fill: border median


@pytest.mark.parametrize("names", [
    (0, "Just Resize", "just resize", 3),
    (1, "Crop and Resize", "Scale to Fit (Inner Fit)", "Inner Fit (Scale to Fit)"),
    (2, "Resize and Fill", "Envelope (Outer Fit)", "Outer Fit (Shrink to Fit)"),
])
def test_resize_mode_indices_and_old_names(names):
    assert {control_maps.resize_mode_name(n) for n in names} == {names[1]}


def test_bad_resize_mode_and_size():
    with pytest.raises(InputError, match="Just Resize, Crop and Resize, Resize and Fill"):
        control_maps.resize_mode_name("Stretch")
    with pytest.raises(InputError, match="at least 8x8"):
        cp.prepare_control_image(Image.fromarray(markers()), "none", (4, 64))


def test_sizes_are_aligned_down_to_multiples_of_8():
    assert cp.prepare_control_image(Image.fromarray(markers()), "none", (100, 70)).shape == (3, 64, 96)


def test_resize_and_fill_masks_the_new_area_of_an_inpaint_map():
    cond = cp.prepare_control_image(Image.fromarray(markers()), "inpaint_only", (64, 64), 2)
    assert (cond[:, :16] == -1).all() and (cond[:, 48:] == -1).all()
    assert np.array_equal(as_uint8(cond[:, 16:48]), markers())
    mask = control_maps.prepare_control_mask(Image.fromarray(np.zeros((32, 64), np.uint8)), (64, 64), "Resize and Fill")
    assert mask.shape == (1, 64, 64) and mask[0, :16].eq(1).all() and mask[0, 16:48].eq(0).all()


def test_unit_mask_follows_the_image_geometry():
    mask = np.zeros((32, 64), np.uint8)
    mask[:, :32] = 255
    cropped = control_maps.prepare_control_mask(Image.fromarray(mask), (64, 64), "Crop and Resize")[0]
    assert cropped[:, :32].eq(1).all() and cropped[:, 32:].eq(0).all()  # 2x to 128 wide, columns 32-95


def test_thin_edges_stay_one_pixel_wide_and_binary_when_enlarged():
    edges = np.zeros((64, 64, 3), np.uint8)
    edges[:, 30] = 255
    cond = cp.prepare_control_image(Image.fromarray(edges), "none", (128, 128), "Just Resize")[0]
    assert set(cond.unique().tolist()) == {0.0, 1.0}
    assert cond[1:126].sum(dim=1).eq(1).all() and cond[1:126, 61].eq(1).all()  # cubic alone: 4 grey pixels
    square = np.zeros((64, 64, 3), np.uint8)
    square[20:40, 20:40] = 255
    cond = cp.prepare_control_image(Image.fromarray(square), "none", (128, 128), "Just Resize")[0]
    assert cond.sum() == 40 * 40 and cond[40:80, 40:80].eq(1).all()


def test_photos_shrink_by_area_and_segmentations_keep_their_colours():
    image = scene(128, 128)
    cond = cp.prepare_control_image(Image.fromarray(image), "none", (64, 64), "Just Resize")
    assert np.array_equal(as_uint8(cond), cv2.resize(image, (64, 64), interpolation=cv2.INTER_AREA))
    seg = filled((10, 200, 30), 48, 48)
    seg[10:30, 5:40], seg[:8] = (200, 10, 90), (5, 5, 250)
    enlarged = as_uint8(cp.prepare_control_image(Image.fromarray(seg), "none", (80, 80), "Just Resize"))
    assert {tuple(c) for c in enlarged.reshape(-1, 3)} == {(10, 200, 30), (200, 10, 90), (5, 5, 250)}


# (image (width, height), target (width, height), mode, resolution): round(k * short side), k the fit's
# scale (Resize and Fill: the smaller of target/image per axis, otherwise the larger), half to even
PIXEL_PERFECT = [
    ((512, 512), (512, 512), "Crop and Resize", 512),
    ((1024, 768), (512, 512), "Crop and Resize", 512),
    ((1024, 768), (512, 512), "Resize and Fill", 384),
    ((1024, 768), (512, 512), "Just Resize", 512),
    ((640, 480), (512, 768), "Crop and Resize", 768),
    ((640, 480), (512, 768), "Resize and Fill", 384),
    ((333, 500), (512, 512), "Crop and Resize", 512),
    ((333, 500), (512, 512), "Resize and Fill", 341),  # 1.024 * 333 = 340.99
    ((256, 128), (101, 512), "Resize and Fill", 50),  # 50.5 rounds to even
    ((256, 128), (103, 512), "Resize and Fill", 52),  # 51.5 rounds to even
]


@pytest.mark.parametrize("image_size, target, mode, expected", PIXEL_PERFECT)
def test_pixel_perfect_resolution(image_size, target, mode, expected):
    assert control_maps.pixel_perfect_resolution(image_size, target, mode) == expected


def test_pixel_perfect_runs_the_module_at_that_resolution():
    image = Image.fromarray(scene(768, 1024))
    for mode, resolution in (("Crop and Resize", 512), ("Resize and Fill", 384)):
        chosen = cp.prepare_control_image(image, "canny", (512, 512), mode, processor_res=resolution)
        perfect = cp.prepare_control_image(image, "canny", (512, 512), mode, processor_res=3, pixel_perfect=True)
        assert torch.equal(perfect, chosen)


# ---- the module list, sliders ------------------------------------------------------------------------------

RES = {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8}
# sd-webui-controlnet 1.1.455: model_free_preprocessors.py, inpaint.py, legacy preprocessor_compiled.py (its
# legacy modules keep the class's Resolution slider), in get_sorted_preprocessors' order
EXPECTED_MODULES = [
    ("none", "none", [RES]),
    ("tile_resample", "tile_resample",
     [RES, {"name": "Down Sampling Rate", "value": 1.0, "min": 1.0, "max": 8.0, "step": 0.01}]),
    ("lineart_standard", "lineart_standard (from white bg & black line)", [RES]),
    ("ip-adapter-auto", "ip-adapter-auto", []),
    ("inpaint_only", "inpaint_only", []),
    ("canny", "canny", [RES, {"name": "Low Threshold", "value": 100, "min": 1, "max": 255, "step": 1},
                        {"name": "High Threshold", "value": 200, "min": 1, "max": 255, "step": 1}]),
    ("invert", "invert (from white bg & black line)", []),
    ("tile_colorfix+sharp", "tile_colorfix+sharp", [{"name": "Variation", "value": 8.0, "min": 3.0, "max": 32.0, "step": 1.0},
                                                    {"name": "Sharpness", "value": 1.0, "min": 0.0, "max": 2.0, "step": 0.01}]),
    ("tile_colorfix", "tile_colorfix", [{"name": "Variation", "value": 8.0, "min": 3.0, "max": 32.0, "step": 1.0}]),
    ("threshold", "threshold",
     [RES, {"name": "Binarization Threshold", "value": 127, "min": 0, "max": 255, "step": 0.01}]),
    ("color", "t2ia_color_grid", [RES]),
    ("shuffle", "shuffle", []),
    ("scribble_xdog", "scribble_xdog", [RES, {"name": "XDoG Threshold", "value": 32, "min": 1, "max": 64, "step": 0.01}]),
    ("ip-adapter_clip_h", "ip-adapter_clip_h", []),
    ("ip-adapter_clip_g", "ip-adapter_clip_g", []),
    ("inpaint", "inpaint_global_harmonious", []),
    ("depth_anything_v2", "depth_anything_v2", []),
    ("blur_gaussian", "blur_gaussian", [RES, {"name": "Sigma", "value": 9.0, "min": 0.01, "max": 64.0, "step": 0.01}]),
]


@pytest.mark.parametrize("alias_names", [False, True])
def test_module_list_and_detail_match_sd_webui_controlnet(alias_names):
    names = [label if alias_names else name for name, label, _ in EXPECTED_MODULES]
    assert cp.module_list(alias_names) == names
    assert cp.module_detail(alias_names) == {
        key: {"model_free": False, "sliders": sliders} for key, (_, _, sliders) in zip(names, EXPECTED_MODULES)}


def test_modules_are_found_by_name_or_label_and_unknown_ones_are_named():
    assert cp.get_module("invert (from white bg & black line)").name == "invert"
    assert cp.sliders("t2ia_color_grid") == [RES]
    with pytest.raises(InputError, match="'depth_midas' is not available; available: none, tile_resample"):
        cp.get_module("depth_midas")


@pytest.mark.parametrize("module, given, expected", [
    ("canny", (-1, -1, -1), (512, 100, 200)),
    ("canny", (None, None, None), (512, 100, 200)),
    ("canny", (768, 1, 255), (768, 1, 255)),
    ("threshold", (64, 0, 999), (64, 0, 0.0)),  # threshold has no second slider: its value is not used
    ("invert", (5, 64, 64), (512, 0.0, 0.0)),  # no sliders at all (webuiapi sends 64s)
    ("blur_gaussian", (-1, 64, -1), (512, 64, 0.0)),
])
def test_slider_values(module, given, expected):
    assert cp.resolve_values(module, *given) == expected


@pytest.mark.parametrize("module, given, message, lenient", [
    ("canny", (512, 0, 200), r"threshold_a 0 is outside canny's Low Threshold range 1-255; send -1 for its "
                             r"default \(100\)", (512, 100, 200)),
    ("canny", (32, -1, -1), "processor_res 32 is outside canny's Resolution range 64-2048", (512, 100, 200)),
    ("tile_resample", (-1, 64, -1), "Down Sampling Rate range 1.0-8.0", (512, 1.0, 0.0)),
    ("canny", (512, math.nan, 200), "threshold_a must be a number", None),
    ("canny", (512, "100", 200), "threshold_a must be a number", None),
])
def test_bad_slider_values_are_refused_or_with_strict_false_defaulted(module, given, message, lenient):
    with pytest.raises(InputError, match=message):
        cp.resolve_values(module, *given)
    if lenient is None:  # not a number: refused either way
        with pytest.raises(InputError, match=message):
            cp.resolve_values(module, *given, strict=False)
    else:  # sd-webui-controlnet's way: the default
        assert cp.resolve_values(module, *given, strict=False) == lenient


@pytest.mark.parametrize("seed, subseed, expected", [(5, -1, 10), (5, 7, 12), (2**32 - 1, 1, 0), (-3, 4, 4)])
def test_numpy_seed_is_seed_plus_subseed(seed, subseed, expected):
    assert cp.numpy_seed(seed, subseed) == expected
