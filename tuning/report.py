"""report.md and its plots: why the winner won, how well it does, how to serve it."""

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd

from common import atomic

LEADERBOARD_COLUMNS = [
    "trial_id", "backbone", "resolution", "unfrozen_blocks", "pooling", "head", "dense_units", "dropout",
    "learning_rate", "lr_schedule", "augmentation", "score", "val_accuracy", "val_balanced_accuracy",
    "val_macro_f1", "epochs", "train_s", "seconds",
    "latency_ms", "model_mb", "fit_mode",
]
EXPORT_COLUMNS = ["format", "file", "size_kb", "test_accuracy", "drop_pp", "latency_ms_p50_1_thread",
                  "latency_ms_p95_1_thread", "latency_ms_p50_all_threads", "latency_ms_p95_all_threads", "status"]


def write_report(run_dir, log=print):
    """Writes report.md, learning_curves.png (and reuses confusion_matrix.png)."""
    run_dir = Path(run_dir)
    config = _read(run_dir / "config.json")
    metrics = _read(run_dir / "metrics.json")
    board_path = run_dir / "leaderboard.csv"
    board = pd.read_csv(board_path, dtype={"trial_id": str}) if board_path.exists() else pd.DataFrame()
    settings = config.get("settings", {})
    image_files = "per_split" in config.get("data", {})
    lines = [f"# Transfer-learning search report: `{run_dir.name}`", ""]
    if metrics:
        plot_learning_curves(metrics, run_dir / "learning_curves.png")
        lines += [f"**Test accuracy: {metrics['test_accuracy']:.4f}** on {metrics['test_images']} test images "
                  f"(evaluated once, after retraining)" + _scores(metrics) + f". Exported model: `{run_dir / 'export'}`.",
                  ""]
    lines += data_section(config)
    lines += search_section(run_dir, board, settings, _read(run_dir / "best_hparams.json"))
    if metrics:
        lines += retrain_section(run_dir, metrics) + export_section(metrics, settings)
    lines += timings_section(_read(run_dir / "timings.json"))
    lines += serving_section(run_dir, image_files)
    atomic.write_text(run_dir / "report.md", "\n".join(lines))
    log(f"report: {run_dir / 'report.md'}")


def data_section(config):
    """What the data was, how it was split, and what the tool decided from it."""
    data, settings = config.get("data", {}), config.get("settings", {})
    lines = ["## Data", "", f"- Source: {data.get('source')} (`{data.get('path')}`), checksum "
             f"`{str(data.get('checksum'))[:16]}…`"]
    if "per_split" in data:
        lines += [f"- {data['images']} images (" + ", ".join(f"{n} {sum(c)}" for n, c in data["per_split"].items())
                  + f"), {data['num_classes']} classes: {', '.join(data['class_names'])}; every image's split in "
                  "`splits.csv`",
                  f"- Sizes {data['width'][0]}–{data['width'][2]} × {data['height'][0]}–{data['height'][2]} px "
                  f"(median {data['width'][1]} × {data['height'][1]}); modes "
                  + ", ".join(f"{m} {n}" for m, n in data["modes"].items())
                  + f"; fed as RGB padded to square, stored at {settings.get('storage_size')} px"]
    else:
        lines += [f"- {data.get('train')} training / {data.get('test')} test images, "
                  f"{data.get('num_classes')} classes: {', '.join(data.get('class_names', []))}"]
    used = config.get("search_images", {})
    lines += ["- Validation: " + ("as given" if "val" in data.get("per_split", {}) else
                                   f"{settings.get('validation_fraction')} of train, stratified, seed {settings.get('seed')}")
              + (f"; the search trained on {used['train']} and validated on {used['validation']} images"
                 if used else ""), ""]
    decisions = config.get("decisions", [])
    if decisions:
        lines += ["### Decided from the data", "", "Each can be overridden by its flag (README: what the tool decides).", ""]
        lines += [f"- `{d['setting']}` = {d['value']}: {d['reason']}" for d in decisions] + [""]
    return lines


def search_section(run_dir, board, settings, best):
    """The search: its settings, the top trials, failures, the accuracy/latency front, the winner."""
    lines = ["## Search", "",
             f"Profile `{settings.get('profile')}`, tuner `{settings.get('tuner')}` (max_epochs "
             f"{settings.get('max_epochs')}, factor {settings.get('factor')}), {len(board)} trials, "
             f"{int((board.get('status') == 'COMPLETED').sum()) if len(board) else 0} completed, ranked by "
             f"`score` = validation {settings.get('objective', 'accuracy')}.",
             "Feature cache: " + ("on. Trials with `augmentation = none` train the top on cached frozen-prefix "
                                  "activations (no random augmentation); augmented trials train end to end."
                                  if settings.get("feature_cache") else "off (every trial end to end)."), "",
             "### Top 10", ""]
    if len(board):
        done = board[board["status"] == "COMPLETED"].sort_values("score", ascending=False).head(10)
        lines += [markdown_table(done, [c for c in LEADERBOARD_COLUMNS if c in done.columns]), ""]
        for status, verb in (("FAILED", "failed"), ("REJECTED", "were rejected before training")):
            ended = board[board["status"] == status]
            if len(ended):
                lines += [f"{len(ended)} trial(s) {verb}: " + "; ".join(
                    f"{r.trial_id}: {r.error}" for r in ended.itertuples()), ""]
        if plot_accuracy_vs_latency(board, run_dir / "accuracy_vs_latency.png"):
            lines += ["Validation accuracy against single-image latency on this CPU, every measured trial "
                      "(Pareto front: no other trial is both faster and more accurate):", "",
                      "![accuracy vs latency](accuracy_vs_latency.png)", ""]
    if best:
        lines += ["### Best hyperparameters", "", f"Trial `{best['trial_id']}`, val_accuracy {best['val_accuracy']:.4f}:", "",
                  markdown_table(pd.DataFrame([best["hyperparameters"]]), list(best["hyperparameters"])), ""]
    return lines


def _also_tried(phase):
    """ " (validation chose it over …)" where phase 2 tried other augmentations."""
    others = [t["augmentation"] for t in phase.get("tried", []) if t["augmentation"] != phase["augmentation"]]
    return f" (validation chose it over {', '.join(others)})" if others else ""


def retrain_section(run_dir, metrics):
    """The two phases (and the refit), the curves, the test evaluation and the TTA choice."""
    lines = ["## Retraining", ""]
    finalists = metrics.get("finalists")
    if finalists:
        lines.append(f"- the search's finalists scored again on the whole validation split "
                     f"({finalists['validation_images']:,} images; the search validated on "
                     f"{finalists['search_validation_images']:,}), {finalists['objective']}: "
                     + ", ".join(f"trial {f['trial_id']} {f['search_score']:.4f} → {f['whole_validation_score']:.4f}"
                                 for f in finalists["finalists"])
                     + f"; trial {finalists['chosen']} was retrained")
    for phase in ("phase1", "phase2"):
        p = metrics.get(phase, {})
        if "skipped" in p:
            lines.append(f"- {phase}: skipped ({p['skipped']})")
        elif "inverse_l2" in p:
            lines.append(f"- {phase}: the linear head fitted exactly [{p['mode']}], C = {p['inverse_l2']} chosen "
                         f"on validation, val_accuracy {p['best_val_accuracy']:.4f}, {p['seconds']:.0f} s")
        elif p:
            lines.append(f"- {phase}: {p['epochs']} epochs at lr {p['learning_rate']:.2e} [{p['mode']}], "
                         f"augmentation {p.get('augmentation', 'as searched')}"
                         + _also_tried(p)
                         + f", best val_accuracy {p['best_val_accuracy']:.4f}, {p['seconds']:.0f} s"
                         + ("" if p.get("kept", True) else "; not kept: it did not beat phase 1 on validation"))
    challenge = metrics.get("linear_head_challenge")
    if challenge:
        lines.append(f"- the exact linear head on the same backbone and size scored {challenge['val_score']:.4f} on "
                     f"validation, the retrained winner {challenge['winner_val_score']:.4f}: "
                     + ("it replaced the winner" if challenge["replaced"] else "the winner stayed"))
    refit = metrics.get("refit")
    if refit and "epochs" in refit:
        lines.append(f"- refit: the final model was trained again on {refit['images']} training and validation "
                     "images, " + ", ".join(f"{phase} for {n} epochs" for phase, n in refit["epochs"].items()))
    lines += ["", "![learning curves](learning_curves.png)", "",
              "## Test evaluation", "", "![confusion matrix](confusion_matrix.png)", ""]
    if (run_dir / "misclassified.png").exists():
        lines += ["Misclassified test images (true → predicted):", "", "![misclassified](misclassified.png)", ""]
    per_class = pd.DataFrame(metrics["per_class"]).T.reset_index(names="class")
    lines += [markdown_table(per_class, ["class", "precision", "recall", "f1", "support"]), ""]
    tta = metrics.get("tta")
    if tta:
        lines += [f"Flip test-time augmentation {'used' if tta['used'] else 'not used'}: validation accuracy "
                  f"{tta['val_accuracy_plain']:.4f} plain, {tta['val_accuracy_flip']:.4f} flip-averaged.", ""]
    return lines


def timings_section(timings):
    """Wall time per stage, and how phase 2 was fitted to the job's deadline."""
    if not timings:
        return []
    stages = {k: v for k, v in timings.items() if not k.endswith("_plan")}
    lines = ["## Wall time", "", markdown_table(pd.DataFrame([stages]), list(stages)), ""]
    if "retrain_plan" in timings:
        plan = timings["retrain_plan"]
        lines += [f"Phase 2 was fitted to the job's deadline on this machine: {plan['reasoning']}."]
        for revision in plan.get("revisions", []):
            lines += [f"After epoch {revision['after_epoch']}, epochs took {revision['epoch_s']:.0f} s: "
                      f"{revision['epochs']} epochs fit, and the learning rate's decay was fitted to them."]
        lines += [""]
    return lines


def export_section(metrics, settings):
    """The exported artifacts, each scored on the test split by its own runtime."""
    exports = metrics.get("exports")
    if not exports:
        return []
    frame = pd.DataFrame(exports.values())
    frame["file"] = [Path(p).name or "export/" for p in frame["path"]]
    frame.loc[frame["format"] == "savedmodel", "file"] = "export/"
    frame["status"] = [s if not why else f"REJECTED: {why}" for s, why in zip(frame["status"], frame["rejected_because"])]
    lines = ["## Exported artifacts", "",
             f"Each scored on all {metrics['test_images']} test images through its own runtime (TensorFlow for the "
             "SavedModel, the LiteRT interpreter for `.tflite`); drop = Keras model's test accuracy "
             f"({metrics['test_accuracy']:.4f}) minus the artifact's, in percentage points (limit "
             f"{settings.get('max_accuracy_drop')}). Latency: one image per call, milliseconds, 200 calls after "
             "warm-up, in a fresh process with 1 thread and with all threads.", "",
             markdown_table(frame, [c for c in EXPORT_COLUMNS if c in frame.columns]), ""]
    tuning = exports.get("tflite-int8", {}).get("top_tuning")
    if tuning and tuning["epochs"]:
        lines += [f"The int8 file's trainable top was fine-tuned on the int8 prefix's own features "
                  f"({tuning['images']} training images, {tuning['epochs']} epochs): validation accuracy "
                  f"{tuning['val_accuracy_before']:.4f} → {tuning['val_accuracy_after']:.4f}"
                  + ("." if tuning["kept"] else " (not kept: the untuned top was converted)."), ""]
    export = metrics.get("export")
    if export:
        lines += [f"SavedModel parity with the Keras model: {export['images']} images, max |Δp| "
                  f"{export['max_abs_diff']:.2e}, same classes: {export['same_classes']}.", ""]
    return lines


def serving_section(run_dir, image_files):
    takes = ("`image_bytes`, string `[batch]` of encoded PNG/JPEG/BMP/GIF files (base64 in TF Serving's REST API)"
             if image_files else "`images`, uint8 `[batch, 28, 28]` raw pixels")
    tflite_takes = ("`pixels`, uint8 `[batch, S, S, 3]`: the image decoded and letterboxed to the side S the "
                    "model was trained on (`predict` does it)" if image_files else "`images` like the SavedModel")
    export = run_dir / "export"
    return ["## Serving the model", "",
            f"`export/` is a TensorFlow SavedModel. Its `serving_default` signature takes {takes}, and returns "
            "`probabilities`, `class_id` and `class_name`; decoding, resizing and preprocessing happen inside. "
            f"The `.tflite` files take {tflite_takes} and return `probabilities`; class names are in "
            "`export/labels.txt`.",
            "", "```bash",
            f"saved_model_cli show --dir {export} --all",
            f"python search.py predict --model {export} image.png",
            f"python search.py predict --model {export / 'model_int8.tflite'} image.png",
            f"docker run -p 8501:8501 -v {export.resolve()}:/models/fashion/1 -e MODEL_NAME=fashion tensorflow/serving",
            "```", ""]


def plot_accuracy_vs_latency(board, path):
    """Scatter of validation accuracy vs latency for every trial, Pareto front marked.

    Returns:
        False when no trial has both figures (nothing plotted).
    """
    if not {"latency_ms", "val_accuracy"} <= set(board.columns):
        return False
    done = board.dropna(subset=["latency_ms", "val_accuracy"])
    if done.empty:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    front = pareto_front(done["latency_ms"].to_numpy(), done["val_accuracy"].to_numpy())
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for backbone, group in done.groupby("backbone"):
        ax.scatter(group["latency_ms"], group["val_accuracy"], label=backbone, alpha=0.6)
    ordered = done.iloc[front].sort_values("latency_ms")
    ax.step(ordered["latency_ms"], ordered["val_accuracy"], where="post", color="black", linewidth=1,
            label="Pareto front")
    ax.scatter(ordered["latency_ms"], ordered["val_accuracy"], facecolors="none", edgecolors="black", s=90)
    rejected = board[board["status"] == "REJECTED"].dropna(subset=["latency_ms"])
    for latency in sorted(set(rejected["latency_ms"])):
        ax.axvline(latency, color="red", alpha=0.3, linestyle=":")
    ax.set_xlabel("single-image latency on this CPU (ms)")
    ax.set_ylabel("validation accuracy")
    ax.set_title("Trials: accuracy vs latency" + (" (dotted: rejected, untrained)" if len(rejected) else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return True


def pareto_front(latency, accuracy):
    """Positions of the points no other point beats on both (lower latency, higher accuracy)."""
    return [i for i in range(len(latency))
            if not any((latency[j] <= latency[i] and accuracy[j] > accuracy[i])
                       or (latency[j] < latency[i] and accuracy[j] >= accuracy[i]) for j in range(len(latency)))]


def _scores(metrics):
    """The test accuracy's 95 % interval, balanced accuracy and macro-F1, where recorded."""
    if "test_accuracy_interval95" not in metrics:
        return ""
    low, high = metrics["test_accuracy_interval95"]
    return (f"; 95 % interval {low:.4f}–{high:.4f}, balanced accuracy {metrics['test_balanced_accuracy']:.4f}, "
            f"macro-F1 {metrics['test_macro_f1']:.4f}")


def markdown_table(frame, columns):
    def cell(value):
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    rows = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    rows += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame[columns].itertuples(index=False)]
    return "\n".join(rows)


def plot_learning_curves(metrics, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    offset = 0
    for phase in ("phase1", "phase2"):
        history = metrics.get(phase, {}).get("history")
        if not history:
            continue
        epochs = range(offset + 1, offset + 1 + len(history["loss"]))
        for ax, key in zip(axes, ("accuracy", "loss")):
            ax.plot(epochs, history[key], marker="o", label=f"{phase} train")
            ax.plot(epochs, history[f"val_{key}"], marker="s", label=f"{phase} validation")
        offset += len(history["loss"])
    for ax, key in zip(axes, ("accuracy", "loss")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Retraining: phase 1 (frozen backbone) → phase 2 (unfrozen top blocks)")
    save_figure(fig, path)


def plot_confusion_matrix(confusion, class_names, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), value in np.ndenumerate(confusion):
        ax.text(j, i, str(value), ha="center", va="center", fontsize=7,
                color="white" if value > confusion.max() / 2 else "black")
    ax.set_title("Test confusion matrix")
    save_figure(fig, path)


def save_figure(fig, path):
    """Writes a matplotlib figure as PNG, atomically, and closes it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic.write_bytes(path, buffer.getvalue())


def _read(path):
    return json.loads(path.read_text()) if path.exists() else {}


def plot_misclassified(images, truth, predicted, class_names, path, most=25):
    """A grid of up to `most` misclassified images captioned "true → predicted"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wrong = np.flatnonzero(truth != predicted)[:most]
    if len(wrong) == 0:
        return False
    columns = min(5, len(wrong))
    rows = -(-len(wrong) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), wrong):
        image = np.asarray(images[int(i)])
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
        ax.set_title(f"{class_names[truth[i]]} →\n{class_names[predicted[i]]}", fontsize=8)
    save_figure(fig, path)
    return True
