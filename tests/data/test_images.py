import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from broken_inputs import (PATIENT_ID, PATIENT_NAME, bomb_png_bytes, write_dicom, write_rgb_png,
                           write_truncated_jpeg)
from medtune.data.images import (WINDOW_PRESETS, ImageError, WindowError, dicom_metadata, image_from_bytes,
                                 load_image, materialise, resolve_image_path)
from medtune.data.schema import ImageRef

REPO = Path(__file__).resolve().parents[2]
VQA_RAD_IMAGES = REPO / "data" / "vqa_rad" / "images"
PATHVQA_IMAGES = Path("/work/shared/data/pathvqa/images")

pydicom = pytest.importorskip("pydicom")
nibabel = pytest.importorskip("nibabel")
from pydicom.data import get_testdata_file  # noqa: E402


def window_reference(values, center, width):
    """DICOM-style linear window written out independently of medtune."""
    values = np.asarray(values, dtype=np.float64)
    return np.clip(np.rint((values - (center - width / 2)) * 255.0 / width), 0, 255).astype(np.uint8)


def minmax_reference(values):
    values = np.asarray(values, dtype=np.float64)
    return window_reference(values, (values.min() + values.max()) / 2, values.max() - values.min())


def grey(image: Image.Image) -> np.ndarray:
    array = np.asarray(image)
    assert image.mode == "RGB" and (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all()
    return array[..., 0]


# ------------------------------------------------------------------------------------------------ paths

def test_relative_paths_resolve_under_the_root(tmp_path):
    assert resolve_image_path("a/b.png", tmp_path) == tmp_path / "a" / "b.png"
    assert resolve_image_path("a/../b.png", tmp_path) == tmp_path / "b.png"


@pytest.mark.parametrize("path", ["../../etc/passwd", "a/../../outside.png", "/etc/passwd"])
def test_escaping_paths_are_refused(tmp_path, path):
    root = tmp_path / "data"
    with pytest.raises(ImageError, match="outside the image root") as error:
        resolve_image_path(path, root)
    assert error.value.file == path


def test_allowed_roots_admit_absolute_paths(tmp_path):
    other = tmp_path / "shared"
    target = str(other / "x.png")
    with pytest.raises(ImageError, match="outside the image root"):
        resolve_image_path(target, tmp_path / "data")
    assert resolve_image_path(target, tmp_path / "data", allowed_roots=[other]) == other / "x.png"
    assert resolve_image_path("../shared/x.png", tmp_path / "data", allowed_roots=[other]) == other / "x.png"


# ------------------------------------------------------------------------------------ broken PIL inputs

def test_pixel_limit_is_checked_before_decoding(tmp_path):
    # The file has a 100000x100000 header and no pixel data: reaching the decoder would give a different error.
    (tmp_path / "huge.png").write_bytes(bomb_png_bytes())
    assert (tmp_path / "huge.png").stat().st_size < 100
    saved = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageError) as error:
        load_image("huge.png", tmp_path)
    assert str(error.value) == (f"{tmp_path / 'huge.png'}: image is 100000x100000 = 10,000,000,000 pixels, over "
                                "the limit of 50,000,000 (possible decompression bomb; raise max_pixels to allow it)")
    assert Image.MAX_IMAGE_PIXELS == saved  # PIL's global guard is restored


def test_pixel_limit_is_the_callers(tmp_path):
    write_rgb_png(tmp_path / "small.png", size=(32, 24))
    assert load_image("small.png", tmp_path, max_pixels=32 * 24).size == (32, 24)
    with pytest.raises(ImageError, match=r"32x24 = 768 pixels, over the limit of 767"):
        load_image("small.png", tmp_path, max_pixels=767)


def test_each_broken_file_has_its_own_reason(tmp_path):
    write_truncated_jpeg(tmp_path / "truncated.jpg")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("not a png\n")
    (tmp_path / "folder.png").mkdir()
    reasons = {}
    for name in ("truncated.jpg", "empty.png", "notes.png", "missing.png", "folder.png"):
        with pytest.raises(ImageError) as error:
            load_image(name, tmp_path)
        assert error.value.file == str(tmp_path / name)
        reasons[name] = error.value.reason
    assert reasons["truncated.jpg"].startswith("truncated or corrupt image data (image file is truncated")
    assert reasons["empty.png"] == "empty file (0 bytes)"
    assert reasons["notes.png"] == "not an image file (PIL does not recognise the format)"
    assert reasons["missing.png"] == "file not found"
    assert reasons["folder.png"] == "is a folder, not an image file"


def test_frames_pick_tiff_pages_and_slices_need_a_volume(tmp_path):
    pages = [Image.new("L", (4, 4), value) for value in (10, 200)]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    assert [grey(load_image(ImageRef("stack.tif", frame=f), tmp_path))[0, 0] for f in (None, 1)] == [10, 200]
    with pytest.raises(ImageError, match=r"frame 2 out of range \(the file has 2 frames\)"):
        load_image(ImageRef("stack.tif", frame=2), tmp_path)
    with pytest.raises(ImageError, match="axis/slice apply only to NIfTI volumes, and this is a 2-D image"):
        load_image(ImageRef("stack.tif", slice=3), tmp_path)


# ------------------------------------------------------------------------------------- mode conversion

def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((8, 16, 3), dtype=np.uint8)
    pixels[0, 0] = 255  # top-left marker
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    Image.fromarray(pixels).save(tmp_path / "phone.png", exif=exif)
    loaded = np.asarray(load_image("phone.png", tmp_path))
    assert loaded.shape == (16, 8, 3)
    assert loaded[0, -1].tolist() == [255, 255, 255]  # the marker is now top-right

@pytest.mark.parametrize("mode, pixel, expected", [
    ("L", 77, (77, 77, 77)),
    ("1", 1, (255, 255, 255)),
    ("LA", (0, 0), (255, 255, 255)),          # fully transparent black -> the white background
    ("LA", (0, 255), (0, 0, 0)),
    ("RGBA", (255, 0, 0, 0), (255, 255, 255)),
    ("RGBA", (255, 0, 0, 255), (255, 0, 0)),
    ("RGBA", (0, 0, 0, 128), (127, 127, 127)),  # half-transparent black on white
    ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
    ("CMYK", (255, 0, 0, 0), (0, 255, 255)),  # full cyan
    ("CMYK", (0, 0, 0, 255), (0, 0, 0)),
])
def test_modes_convert_to_rgb(tmp_path, mode, pixel, expected):
    suffix = ".jpg" if mode == "CMYK" else ".png"
    image = Image.new(mode, (4, 4), pixel)
    if mode == "CMYK":
        image.save(tmp_path / f"x{suffix}", quality=100)
    else:
        image.save(tmp_path / f"x{suffix}")
    loaded = np.asarray(load_image(f"x{suffix}", tmp_path))
    assert loaded.shape == (4, 4, 3)
    assert np.abs(loaded.astype(int) - expected).max() <= (3 if mode == "CMYK" else 1)


def test_palette_with_transparent_index_goes_on_white(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([10, 20, 30, 200, 0, 0] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 0
    image.save(tmp_path / "p.png", transparency=0)
    assert np.asarray(load_image("p.png", tmp_path)).tolist() == [[[255, 255, 255], [200, 0, 0]]]


def test_sixteen_bit_png_stretches_its_own_range(tmp_path):
    values = np.array([[1000, 2000], [3000, 1500]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    assert grey(load_image("deep.png", tmp_path)).tolist() == minmax_reference(values).tolist()


def test_bundled_vqa_rad_jpeg_loads_unchanged():
    path = next(iter(sorted(VQA_RAD_IMAGES.glob("*.jpg"))), None)
    if path is None:
        pytest.skip("bundled VQA-RAD images absent")
    with Image.open(path) as reference:
        expected = np.asarray(reference.convert("RGB"))
    assert np.array_equal(np.asarray(load_image(path.name, VQA_RAD_IMAGES)), expected)


def test_pathvqa_cmyk_jpegs_become_rgb():
    cmyk = []
    for path in sorted(PATHVQA_IMAGES.glob("*.jpg"))[:300] if PATHVQA_IMAGES.is_dir() else []:
        with Image.open(path) as image:
            if image.mode == "CMYK":
                cmyk.append(path)
        if len(cmyk) == 3:
            break
    if not cmyk:
        pytest.skip("PathVQA CMYK images absent")
    for path in cmyk:
        with Image.open(path) as image:
            c, m, y, k = (np.asarray(image, dtype=np.float64)[..., i] for i in range(4))
        # Naive CMYK -> RGB without colour management: R = (255 - C)(255 - K)/255, etc.
        expected = np.stack([(255 - x) * (255 - k) / 255 for x in (c, m, y)], axis=-1)
        loaded = load_image(path.name, PATHVQA_IMAGES)
        assert loaded.mode == "RGB" and loaded.size == Image.open(path).size
        assert np.abs(np.asarray(loaded, dtype=np.float64) - expected).max() <= 1.0


# -------------------------------------------------------------------------------------------------- DICOM

def test_ct_rescale_and_preset_window_match_the_reference():
    path = get_testdata_file("CT_small.dcm")
    dataset = pydicom.dcmread(path)
    hounsfield = dataset.pixel_array * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
    assert "WindowCenter" not in dataset
    assert np.array_equal(grey(load_image(path, "/")), minmax_reference(hounsfield))
    for preset in ("lung", "mediastinum", "bone"):
        center, width = WINDOW_PRESETS[preset]
        assert np.array_equal(grey(load_image(path, "/", window=preset)), window_reference(hounsfield, center, width))


def test_window_from_file_and_preset_override():
    path = get_testdata_file("MR_small.dcm")
    dataset = pydicom.dcmread(path)
    values = dataset.pixel_array.astype(np.float64)
    center, width = float(dataset.WindowCenter), float(dataset.WindowWidth)
    assert np.array_equal(grey(load_image(path, "/")), window_reference(values, center, width))
    assert np.array_equal(grey(load_image(path, "/", window="brain")), window_reference(values, 40, 80))
    assert np.array_equal(grey(load_image(path, "/", window="minmax")), minmax_reference(values))
    with pytest.raises(WindowError, match="unknown window preset 'lungs'"):
        load_image(path, "/", window="lungs")


def test_multi_valued_window_uses_the_first_pair(tmp_path):
    pixels = (np.arange(32 * 32).reshape(32, 32) * 3 - 1000).astype(np.int16)
    write_dicom(tmp_path / "w.dcm", pixels, window=([40, 400], [80, 2000]), slope=2.0, intercept=-10)
    expected = window_reference(pixels * 2.0 - 10, 40, 80)
    assert np.array_equal(grey(load_image("w.dcm", tmp_path)), expected)


def test_voi_lut_is_used_when_the_file_has_no_window(tmp_path):
    from pydicom.dataset import Dataset

    pixels = (np.arange(16 * 16).reshape(16, 16) * 4).astype(np.uint16)  # 0..1020
    write_dicom(tmp_path / "lut.dcm", pixels)
    dataset = pydicom.dcmread(tmp_path / "lut.dcm")
    table = Dataset()
    table.add_new(0x00283002, "US", [256, 0, 16])  # LUTDescriptor: 256 entries for inputs 0..255, 16-bit out
    table.add_new(0x00283006, "US", [min(4 * i, 1000) for i in range(256)])  # LUTData: saturates at input 250
    dataset.VOILUTSequence = [table]
    dataset.save_as(tmp_path / "lut.dcm")
    through_table = np.array(table.LUTData)[np.clip(pixels, 0, 255)]
    assert np.array_equal(grey(load_image("lut.dcm", tmp_path)), minmax_reference(through_table))
    # A preset still overrides the file's lookup table.
    assert np.array_equal(grey(load_image("lut.dcm", tmp_path, window="bone")), window_reference(pixels, 400, 1800))


def test_monochrome1_is_inverted(tmp_path):
    pixels = np.arange(16 * 16).reshape(16, 16).astype(np.uint16) * 10
    write_dicom(tmp_path / "m2.dcm", pixels)
    write_dicom(tmp_path / "m1.dcm", pixels, photometric="MONOCHROME1")
    m2, m1 = grey(load_image("m2.dcm", tmp_path)), grey(load_image("m1.dcm", tmp_path))
    assert np.array_equal(m1, 255 - m2) and m2[0, 0] == 0 and m1[0, 0] == 255


def test_multi_frame_selects_the_frame(tmp_path):
    frames = np.stack([np.full((8, 8), 100 * (i + 1), dtype=np.uint16) for i in range(3)])
    frames[:, 0, 0] = 0  # so min/max windowing has a range
    write_dicom(tmp_path / "mf.dcm", frames, frames=3)
    images = [grey(load_image(ImageRef("mf.dcm", frame=i), tmp_path)) for i in range(3)]
    assert [int(image[4, 4]) for image in images] == [255, 255, 255]
    assert all(image[0, 0] == 0 for image in images)
    with pytest.raises(ImageError, match=r"frame 3 out of range \(the file has 3 frames\)"):
        load_image(ImageRef("mf.dcm", frame=3), tmp_path)


def test_rgb_dicom_frames_pass_through():
    path = get_testdata_file("SC_rgb_rle_2frame.dcm")
    reference = pydicom.dcmread(path).pixel_array  # (frames, rows, cols, 3), RGB
    for frame in (0, 1):
        image = load_image(ImageRef(path, frame=frame), "/", allow_burned_in=True)  # a secondary capture
        assert np.array_equal(np.asarray(image), reference[frame])


def test_missing_pydicom_gives_an_install_hint(monkeypatch, tmp_path):
    write_dicom(tmp_path / "x.dcm", np.zeros((4, 4)))
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(ImportError, match=r"pip install 'medtune\[dicom\]'"):
        load_image("x.dcm", tmp_path)


def test_dicom_metadata_is_whitelisted(tmp_path):
    write_dicom(tmp_path / "p.dcm", np.zeros((4, 4)), modality="DX", body_part="CHEST", view="PA")
    metadata = dicom_metadata(tmp_path / "p.dcm")
    assert metadata == {"modality": "DX", "body_part": "CHEST", "view": "PA", "photometric": "MONOCHROME2",
                        "rows": 4, "columns": 4, "bits_stored": 16}
    for name in ("CT_small.dcm", "MR_small.dcm"):
        dataset = pydicom.dcmread(get_testdata_file(name))
        text = repr(dicom_metadata(get_testdata_file(name)))
        assert str(dataset.PatientName) not in text and str(dataset.PatientID) not in text


def test_materialised_dicom_carries_no_patient_data(tmp_path):
    write_dicom(tmp_path / "p.dcm", np.arange(256).reshape(16, 16))
    out = materialise(ImageRef("p.dcm"), tmp_path, tmp_path / "png")
    data = (tmp_path / "png" / out.path).read_bytes()
    for secret in (PATIENT_NAME, "Doe", "Quixotic", PATIENT_ID, "St Example"):
        assert secret.encode() not in data
    for name in ("CT_small.dcm", "MR_small.dcm"):
        source = Path(get_testdata_file(name))
        ref = materialise(ImageRef(source.name), source.parent, tmp_path / "png")
        data = (tmp_path / "png" / ref.path).read_bytes()
        dataset = pydicom.dcmread(source)
        assert str(dataset.PatientName).encode() not in data and str(dataset.PatientID).encode() not in data
        assert Image.open(tmp_path / "png" / ref.path).info == {}


def test_truncated_dicom_error_does_not_quote_the_file(tmp_path):
    write_dicom(tmp_path / "t.dcm", np.zeros((16, 16)), truncate_pixels=True)
    with pytest.raises(ImageError, match="DICOM pixel data cannot be decoded") as error:
        load_image("t.dcm", tmp_path)
    assert "Doe" not in str(error.value) and PATIENT_ID not in str(error.value)


# -------------------------------------------------------------------------------------------------- NIfTI

def ras_volume(shape=(4, 5, 6)):
    """Distinct values per voxel: value = x + 10 y + 100 z, in voxel (RAS) order."""
    x, y, z = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    return (x + 10 * y + 100 * z).astype(np.float32)


def display_reference(volume, axis, index):
    """Radiological display of a RAS volume: superior/anterior up, patient right on the left."""
    plane = {"sagittal": volume[index], "coronal": volume[:, index], "axial": volume[:, :, index]}[axis]
    return minmax_reference(plane.T[::-1, ::-1])


def save_nifti(path, data, affine=np.eye(4), **header):
    image = nibabel.Nifti1Image(data, affine)
    for key, value in header.items():
        image.header[key] = value
    nibabel.save(image, str(path))
    return path


@pytest.mark.parametrize("axis, index, size", [("axial", None, (4, 5)), ("axial", 1, (4, 5)),
                                               ("coronal", 2, (4, 6)), ("sagittal", 0, (5, 6))])
def test_nifti_slices_follow_the_radiological_convention(tmp_path, axis, index, size):
    volume = ras_volume()
    save_nifti(tmp_path / "v.nii.gz", volume)
    image = load_image(ImageRef("v.nii.gz", axis=axis, slice=index), tmp_path)
    expected_index = index if index is not None else volume.shape[2] // 2
    assert image.size == size
    assert np.array_equal(grey(image), display_reference(volume, axis, expected_index))


def test_nifti_orientation_does_not_change_the_picture(tmp_path):
    volume = ras_volume()
    save_nifti(tmp_path / "ras.nii", volume)
    # The same anatomy stored as LPS with the axes in (z, y, x) order.
    stored = np.transpose(volume[::-1, ::-1, :], (2, 1, 0)).copy()
    affine = np.array([[0, 0, -1, 3], [0, -1, 0, 4], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)
    save_nifti(tmp_path / "lps.nii", stored, affine)
    for axis, index in (("axial", 2), ("coronal", 1), ("sagittal", 3)):
        same = [np.asarray(load_image(ImageRef(n, axis=axis, slice=index), tmp_path)) for n in ("ras.nii", "lps.nii")]
        assert np.array_equal(*same)


def test_nifti_windows_presets_and_header_range(tmp_path):
    hounsfield = np.linspace(-1000, 1000, 4 * 4 * 3).reshape(4, 4, 3).astype(np.float32)
    save_nifti(tmp_path / "ct.nii.gz", hounsfield)
    image = load_image(ImageRef("ct.nii.gz", slice=1), tmp_path, window="lung")
    assert np.array_equal(grey(image), window_reference(hounsfield[:, :, 1].T[::-1, ::-1], -600, 1500))
    save_nifti(tmp_path / "cal.nii.gz", hounsfield, cal_min=-100, cal_max=100)
    image = load_image(ImageRef("cal.nii.gz", slice=1), tmp_path)
    assert np.array_equal(grey(image), window_reference(hounsfield[:, :, 1].T[::-1, ::-1], 0, 200))
    with pytest.raises(ImageError, match=r"axial slice 3 out of range \(the volume has 3\)"):
        load_image(ImageRef("ct.nii.gz", slice=3), tmp_path)


def test_four_d_nifti_frame_picks_the_volume(tmp_path):
    volume = ras_volume((4, 5, 6))
    series = np.stack([volume, -volume], axis=-1)  # two time points
    save_nifti(tmp_path / "t.nii.gz", series)
    for frame, expected in ((None, volume), (0, volume), (1, -volume)):
        image = load_image(ImageRef("t.nii.gz", frame=frame), tmp_path)
        assert np.array_equal(grey(image), display_reference(expected, "axial", 3))
    with pytest.raises(ImageError, match=r"frame 2 out of range \(the file has 2 volumes"):
        load_image(ImageRef("t.nii.gz", frame=2), tmp_path)


# --------------------------------------------------------------------------------------- bytes, materialise

def test_uploads_load_like_files(tmp_path):
    write_rgb_png(tmp_path / "a.png")
    write_dicom(tmp_path / "d.dcm", np.arange(64).reshape(8, 8))
    save_nifti(tmp_path / "v.nii.gz", ras_volume())
    for name in ("a.png", "d.dcm", "v.nii.gz"):
        from_file = np.asarray(load_image(name, tmp_path, window=None))
        from_bytes = np.asarray(image_from_bytes((tmp_path / name).read_bytes(), name=name))
        assert np.array_equal(from_file, from_bytes), name
    assert np.array_equal(np.asarray(image_from_bytes((tmp_path / "d.dcm").read_bytes(), name="blob")),
                          np.asarray(load_image("d.dcm", tmp_path)))  # recognised by the DICM preamble
    with pytest.raises(ImageError, match="upload: image is 100000x100000"):
        image_from_bytes(bomb_png_bytes())
    with pytest.raises(ImageError, match="upload: empty file"):
        image_from_bytes(b"")
    with pytest.raises(ImageError, match="x.png: not an image file"):
        image_from_bytes(b"hello", name="x.png")


def test_materialise_is_deterministic_and_strips_text_chunks(tmp_path):
    write_rgb_png(tmp_path / "src.png", text={"Author": PATIENT_NAME, "Comment": "private"})
    assert Image.open(tmp_path / "src.png").info.get("Author") == PATIENT_NAME
    first = materialise(ImageRef("src.png"), tmp_path, tmp_path / "out")
    again = materialise(ImageRef("src.png"), tmp_path, tmp_path / "out")
    windowed = materialise(ImageRef("src.png"), tmp_path, tmp_path / "out", window="lung")
    assert first == again and first.path != windowed.path and "src" not in first.path
    data = (tmp_path / "out" / first.path).read_bytes()
    assert b"tEXt" not in data and b"iTXt" not in data and PATIENT_NAME.encode() not in data
    assert np.array_equal(np.asarray(load_image(first, tmp_path / "out")), np.asarray(load_image("src.png", tmp_path)))


def test_loaded_images_carry_no_source_metadata(tmp_path):
    from PIL import ImageCms

    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x013B] = PATIENT_NAME  # EXIF Artist
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photo.jpg", comment=PATIENT_NAME.encode(), icc_profile=profile,
                                 exif=exif)
    with Image.open(tmp_path / "photo.jpg") as source:
        assert {"comment", "icc_profile", "exif"} <= set(source.info)
    assert load_image("photo.jpg", tmp_path).info == {}
    out = materialise(ImageRef("photo.jpg"), tmp_path, tmp_path / "out")
    data = (tmp_path / "out" / out.path).read_bytes()
    assert PATIENT_NAME.encode() not in data and b"iCCP" not in data and b"eXIf" not in data


def test_materialise_names_frames_apart(tmp_path):
    frames = np.stack([np.full((4, 4), v, dtype=np.uint16) for v in (0, 500)])
    frames[:, 0, 0] = 1000
    write_dicom(tmp_path / "mf.dcm", frames, frames=2)
    refs = {materialise(ImageRef("mf.dcm", frame=i), tmp_path, tmp_path / "out").path for i in (0, 1)}
    assert len(refs) == 2


@pytest.mark.parametrize("nan_share, words", [(1.0, "axial slice 1 has all of its values NaN or infinite"),
                                              (0.25, "axial slice 1 has 5 of 20 (25.0%) of its values NaN")])
def test_nan_in_a_nifti_slice_is_an_error_in_check_load_and_materialise(nan_share, words, tmp_path, capsys):
    """A slice with NaN would become a black picture (all NaN) or one with holes (some): never an image."""
    import re

    from medtune.cli import main
    from medtune.data.jsonl import write_samples
    from medtune.data.schema import qa_sample

    volume = ras_volume()
    plane = volume[:, :, 1]
    plane.flat[:round(nan_share * plane.size)] = np.nan
    save_nifti(tmp_path / "scan.nii.gz", volume)
    with pytest.raises(ImageError, match=re.escape(words)):
        load_image(ImageRef("scan.nii.gz", slice=1), tmp_path)
    assert np.asarray(load_image(ImageRef("scan.nii.gz", slice=0), tmp_path)).any()   # other slices still load
    canonical = tmp_path / "data.jsonl"
    write_samples(canonical, [qa_sample("r0", "What?", "A scan.", images=[ImageRef("scan.nii.gz", slice=1)])])
    assert main(["data", "check", str(canonical)]) == 1
    assert words in capsys.readouterr().out
    out, pngs = tmp_path / "png.jsonl", tmp_path / "png"
    assert main(["data", "convert", "--to", "canonical", str(canonical), str(out), "--materialise", str(pngs)]) == 2
    assert "image could not be materialised" in capsys.readouterr().err
    assert not out.exists() and not list(pngs.glob("*.png"))
