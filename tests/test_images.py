"""Image-file datasets end to end: folders and manifests in, a SavedModel taking image bytes out;
every malformed tree refused before any work."""

import json
import shutil
import struct
import zlib

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image

from cli import assert_user_error, run_cli, run_main_without_tensorflow
from data_pipeline.folders import scan
from image_folders import CLASSES, sample_photos, write_dataset


@pytest.fixture(scope="module")
def folder_job(tmp_path_factory):
    """The smoke profile's whole job on a class-per-folder tree of mixed sizes, modes and
    formats, with matplotlib's real photos among the images."""
    root = write_dataset(tmp_path_factory.mktemp("data") / "shapes", per_class=36, seed=3)
    for i, photo in enumerate(sample_photos()):
        shutil.copy(photo, root / CLASSES[i % len(CLASSES)] / f"real_{photo.name}")
    run_dir = tmp_path_factory.mktemp("run") / "r"
    result = run_cli("--profile", "smoke", "--data", root, "--run-dir", run_dir, "--unfrozen-blocks", "0,2",
                     "--resolutions", "96", "--time-budget", "30s", "--retrain-subset", "0", timeout=900)
    return root, run_dir, result


def test_whole_job_on_an_image_folder(folder_job):
    root, run_dir, result = folder_job
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    splits = pd.read_csv(run_dir / "splits.csv")
    test = splits[splits["split"] == "test"]
    assert len(splits) == 3 * 36 + len(sample_photos())
    assert set(splits["split"]) == {"train", "test"} and set(splits["label"]) == set(CLASSES)
    assert metrics["test_images"] == len(test)
    majority = test["label"].value_counts().max() / len(test)
    assert metrics["test_accuracy"] > majority + 0.1, (metrics["test_accuracy"], majority)
    config = json.loads((run_dir / "config.json").read_text())
    # The flag wins over the size the data would decide (tests/test_data_decisions.py).
    assert config["settings"]["choices"]["resolutions"] == [96]
    assert "resolutions" not in {d["setting"] for d in config["decisions"]}
    # The misclassified grid is there exactly when test files are misclassified, counted
    # here from the export's own predictions on the raw files (±1: a near tie).
    wrong = int(np.sum(export_classes(root, run_dir, test["path"]) != test["label"].to_numpy()))
    assert abs(wrong - round((1 - metrics["test_accuracy"]) * len(test))) <= 1, wrong
    if wrong > 1:
        grid = Image.open(run_dir / "misclassified.png")
        assert grid.height > 100 and grid.width > 100  # at least one captioned image
        assert "![misclassified](misclassified.png)" in (run_dir / "report.md").read_text()
    elif wrong == 0 and metrics["test_accuracy"] == 1.0:
        assert not (run_dir / "misclassified.png").exists()
        assert "misclassified" not in (run_dir / "report.md").read_text()


def export_classes(root, run_dir, paths):
    """The class name the SavedModel gives each image file (its raw bytes, as served)."""
    serve = tf.saved_model.load(str(run_dir / "export")).signatures["serving_default"]
    encoded = tf.constant([(root / path).read_bytes() for path in paths])
    return np.array([name.decode() for name in serve(image_bytes=encoded)["class_name"].numpy()])


def test_the_export_scores_the_raw_test_files_as_metrics_json(folder_job):
    root, run_dir, _ = folder_job
    splits = pd.read_csv(run_dir / "splits.csv")
    test = splits[splits["split"] == "test"]
    serve = tf.saved_model.load(str(run_dir / "export")).signatures["serving_default"]
    assert list(serve.structured_input_signature[1]) == ["image_bytes"]
    encoded = tf.constant([(root / path).read_bytes() for path in test["path"]])
    predicted = [name.decode() for name in serve(image_bytes=encoded)["class_name"].numpy()]
    accuracy = np.mean(np.array(predicted) == test["label"].to_numpy())
    recorded = json.loads((run_dir / "metrics.json").read_text())["test_accuracy"]
    assert abs(accuracy - recorded) <= 0.005


def test_predict_on_a_folder_and_files_of_any_size(folder_job, tmp_path):
    root, run_dir, _ = folder_job
    big = tmp_path / "big.jpg"
    Image.open(sample_photos()[1]).convert("RGB").resize((900, 700)).save(big)
    output = tmp_path / "predictions.csv"
    result = run_cli("predict", "--model", run_dir / "export", root / "circle", big, "--output", output)
    assert result.returncode == 0, result.stderr
    rows = pd.read_csv(output)
    files = sorted((root / "circle").iterdir())
    assert len(rows) == len(files) + 1
    # Each row is the SavedModel's answer for that file, whatever its size: a folder's
    # files in name order, then the big photo.
    assert list(rows["input"]) == [str(path) for path in files] + [str(big)], list(rows["input"])
    assert list(rows["class_name"]) == list(export_classes(root, run_dir, files + [big]))
    assert rows["confidence"].between(0.33, 1).all()  # the top one of 3 classes
    assert len(result.stdout.strip().splitlines()) == len(rows)


def test_tflite_exports_of_image_files_take_decoded_pixels_and_agree(folder_job, tmp_path):
    root, run_dir, _ = folder_job
    exports = json.loads((run_dir / "export" / "exports.json").read_text())
    assert list(exports) == ["savedmodel", "tflite", "tflite-fp16", "tflite-int8"]
    assert exports["savedmodel"]["input"] == "image_bytes"
    assert {exports[f]["input"] for f in ("tflite", "tflite-fp16", "tflite-int8")} == {"pixels"}
    assert abs(exports["tflite"]["drop_pp"]) <= 0.5  # a few dozen test files: one file is ~2 pp
    classes = {}
    for name in ("", "model.tflite", "model_int8.tflite"):
        output = tmp_path / f"{name or 'savedmodel'}.csv"
        result = run_cli("predict", "--model", run_dir / "export" / name, root / "circle", "--output", output)
        assert result.returncode == 0, result.stderr
        classes[name] = pd.read_csv(output)
    saved = classes[""]
    clear = saved["confidence"].to_numpy() >= 0.6
    np.testing.assert_array_equal(classes["model.tflite"]["class_name"][clear], saved["class_name"][clear])
    # int8 rounding may flip what the float model barely decides (a smoke model's median
    # confidence on 3 classes is about 0.5), not what it is sure of.
    assert clear.sum() >= 5, saved["confidence"].describe()
    agreement = np.mean(classes["model_int8.tflite"]["class_name"][clear] == saved["class_name"][clear])
    assert agreement >= 0.9, agreement


def test_saved_model_cli_runs_the_export_on_a_real_jpeg(folder_job, tmp_path):
    import subprocess

    _, run_dir, _ = folder_job
    photo = tmp_path / "photo.jpg"
    Image.open(sample_photos()[0]).convert("RGB").resize((320, 240)).save(photo, quality=90)
    np.save(tmp_path / "bytes.npy", np.array([photo.read_bytes()]))  # fixed-width bytes: no pickle needed
    result = subprocess.run(
        ["saved_model_cli", "run", "--dir", str(run_dir / "export"), "--tag_set", "serve",
         "--signature_def", "serving_default", "--inputs", f"image_bytes={tmp_path / 'bytes.npy'}"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    names = [name for name in CLASSES if f"b'{name}'" in result.stdout]
    assert len(names) == 1, result.stdout[-2000:]


def test_a_resumed_run_reuses_the_image_store(folder_job, capsys):
    """What retrain and export do first when they reopen a run of image files (in this
    process: a whole export only to reach it took minutes): the store is read, not rebuilt."""
    from tuning.jobs import load_source, materialize
    from tuning.run_dir import read_config
    from tuning.settings import Settings

    root, run_dir, _ = folder_job
    store = list((run_dir / "image_store").glob("*.u8"))
    assert len(store) == 1
    before = store[0].stat().st_mtime_ns
    settings = Settings.from_dict(read_config(run_dir)["settings"])
    dataset = materialize(load_source(settings), settings, run_dir)
    assert "image store: reusing" in capsys.readouterr().out
    assert store[0].stat().st_mtime_ns == before
    splits = pd.read_csv(run_dir / "splits.csv")
    assert len(dataset.y_test) == (splits["split"] == "test").sum()
    assert dataset.x_test.shape[1:3] == (settings.storage_size, settings.storage_size)


def test_given_train_val_test_splits_are_used_as_given(tmp_path):
    root = write_dataset(tmp_path / "d", per_class=9, layout="splits")
    files = scan(root)
    counts = {split: len(files.split(split)) for split in ("train", "val", "test")}
    assert counts == {"train": 27, "val": 9, "test": 9}
    assert all(f.split == f.name.split("/")[0] for f in files.files)


def test_a_manifest_with_relative_and_absolute_paths(tmp_path):
    root = write_dataset(tmp_path / "d", per_class=6)
    rows = []
    for i, path in enumerate(sorted(root.rglob("*.*"))):
        name = str(path) if i % 2 else path.relative_to(root).as_posix()
        rows.append({"path": name, "label": path.parent.name, "split": "test" if i % 3 == 0 else "train"})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    files = scan(root / "manifest.csv")
    assert files.class_names == CLASSES and len(files.files) == 18
    assert [f.split for f in files.files] == [r["split"] for r in rows]


def png_bytes(width, height):
    """A valid PNG header (IHDR) claiming `width`×`height`, then IEND: no pixel data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def broken_crc(path):
    data = bytearray(path.read_bytes())
    idat = data.index(b"IDAT")
    data[idat + 8] ^= 0xFF  # a byte of compressed pixels: the chunk's CRC no longer matches
    return bytes(data)


def truncated(path):
    data = path.read_bytes()
    return data[: len(data) // 2]


MALFORMED = {
    "truncated JPEG": (lambda r: (r / "circle" / "bad.jpg", truncated(r / "circle" / "circle_001.jpg")), "bad.jpg", "corrupt JPEG"),
    "zero-byte file": (lambda r: (r / "square" / "empty.png", b""), "empty.png", "file is empty"),
    "text named .png": (lambda r: (r / "square" / "notes.png", b"just some text\n"), "notes.png", "not an image"),
    "PNG with a broken CRC": (lambda r: (r / "triangle" / "crc.png", broken_crc(next((r / "triangle").glob("*.png")))),
                              "crc.png", "corrupt PNG"),
    "decompression bomb": (lambda r: (r / "circle" / "bomb.png", png_bytes(60000, 60000)), "bomb.png",
                           "decompression bomb"),
    "image outside class folders": (lambda r: (r / "stray.jpg", (r / "circle" / "circle_001.jpg").read_bytes()),
                                    "stray.jpg", "outside any class folder"),
}


@pytest.fixture
def good_tree(tmp_path):
    return write_dataset(tmp_path / "data", per_class=6)


def refused(data, tmp_path, command="data"):
    """The error line of `command` refusing `data` (a search: before writing anything)."""
    run_dir = tmp_path / "run"
    extra = ["--run-dir", run_dir] if command == "search" else []
    result = run_cli(command, "--profile", "smoke", "--data", data, *extra)
    assert_user_error(result, "error: ")
    assert not run_dir.exists()
    return result.stderr.strip()


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_image_is_refused_naming_it(good_tree, tmp_path, case):
    make, name, fault = MALFORMED[case]
    path, content = make(good_tree)
    path.write_bytes(content)
    # The search checks exactly as `data` does; two cases go through it end to end.
    command = "search" if case in ("truncated JPEG", "decompression bomb") else "data"
    line = refused(good_tree, tmp_path, command)
    assert name in line and fault in line, line


def not_a_run(tree, run_dir):
    """`run_dir` made a folder of someone's files, to be overwritten."""
    (run_dir / "2024").mkdir(parents=True)
    (run_dir / "notes.txt").write_text("my notes")
    return ["--overwrite"], (str(run_dir), "not a run of this tool")


def empty_image(tree, run_dir):
    (tree / "circle" / "empty.png").write_bytes(b"")
    return [], ("empty.png", "file is empty")


@pytest.mark.parametrize("fault", [empty_image, not_a_run])
@pytest.mark.parametrize("command", ["search", "job"])
def test_bad_input_is_refused_before_tensorflow_loads(good_tree, tmp_path, command, fault):
    """The search and the whole job check every file and the run dir first: bad input is
    refused within a second, not after TensorFlow's start-up, and nothing is written."""
    run_dir = tmp_path / "run"
    flags, words = fault(good_tree, run_dir)
    before = sorted(run_dir.rglob("*")) if run_dir.exists() else None
    result = run_main_without_tensorflow(*(["search"] if command == "search" else []), "--profile", "smoke",
                                         "--data", good_tree, "--run-dir", run_dir, *flags)
    assert "TensorFlow was imported" not in result.stderr, "the bad input was found after TensorFlow loaded"
    assert_user_error(result, *words)
    assert (sorted(run_dir.rglob("*")) if run_dir.exists() else None) == before


def test_skip_bad_images_leaves_them_out_and_lists_them(good_tree, tmp_path):
    (good_tree / "circle" / "empty.png").write_bytes(b"")
    (good_tree / "square" / "notes.png").write_bytes(b"text")
    result = run_cli("data", "--profile", "smoke", "--data", good_tree, "--skip-bad-images")
    assert result.returncode == 0, result.stderr
    assert "skipped:     2 bad images" in result.stdout
    files = scan(good_tree, skip_bad=True)
    assert {p.name for p, _ in files.bad} == {"empty.png", "notes.png"} and len(files.files) == 18


@pytest.mark.parametrize("case, fault", [
    ("one class", "1 class"),
    ("empty class folder", "class folder has no images"),
    ("different class sets", "differ from train/"),
])
def test_a_malformed_tree_is_refused(tmp_path, case, fault):
    if case == "one class":
        root = write_dataset(tmp_path / "data", per_class=4)
        for kind in CLASSES[1:]:
            shutil.rmtree(root / kind)
    elif case == "empty class folder":
        root = write_dataset(tmp_path / "data", per_class=4)
        (root / "hexagon").mkdir()
        (root / "hexagon" / "README.txt").write_text("none yet")
    else:
        root = write_dataset(tmp_path / "data", per_class=6, layout="splits")
        (root / "test" / "circle").rename(root / "test" / "oval")
    assert fault in refused(root, tmp_path)


@pytest.mark.parametrize("row, fault", [
    ({"path": "circle/missing.png", "label": "circle"}, "line 4: circle/missing.png: file not found"),
    ({"path": "circle/circle_000.png", "label": ""}, "line 4: empty label"),
])
def test_a_bad_manifest_row_is_refused(good_tree, tmp_path, row, fault):
    rows = [{"path": "circle/circle_001.jpg", "label": "circle"}, {"path": "square/square_000.png", "label": "square"},
            row]
    pd.DataFrame(rows).to_csv(good_tree / "manifest.csv", index=False)
    line = refused(good_tree / "manifest.csv", tmp_path, "search")
    assert "manifest.csv" in line and fault in line, line


def test_data_summary_of_an_image_folder(good_tree):
    (good_tree / ".DS_Store").write_bytes(b"\0")
    (good_tree / "circle" / "notes.txt").write_text("not an image")
    result = run_cli("data", "--profile", "cpu", "--data", good_tree)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "images:      18 (train 15, test 3)" in out
    assert "ignored:     2 hidden or non-image files" in out
    assert "modes:" in out and "RGBA" in out and " L " in out
    assert "fed as:      RGB" in out and "searches 96, 224 px" in out  # 96 px: a 3×3 final map; 224: the cpu ladder's top
