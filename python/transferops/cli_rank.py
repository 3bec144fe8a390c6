"""``transferops rank``: rank candidate models for a labelled target task, from their saved
features (one file per model) or by running the models themselves over the data
(:func:`transferops.rank_models`). A user's mistake is one ``error:`` line naming the file."""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from .cli import CLIError


def _load_array(path: str, what: str):
    """The array in a .npy/.npz/.pt/.safetensors file: the only one it holds, or the one named
    "features"/"labels" (``what``), as a real-valued tensor. Files are untrusted: no pickles
    (NumPy's refused, torch's restricted to tensors), safetensors headers validated. Every
    failure is a CLIError naming the file."""
    import pickle

    import numpy as np
    import torch

    suffix = path.rsplit(".", 1)[-1].lower() if "." in Path(path).name else ""
    if suffix not in ("npy", "npz", "pt", "safetensors"):
        raise CLIError(f"{path}: {what}: expected a .npy, .npz, .pt or .safetensors file")
    if Path(path).is_dir():
        raise CLIError(f"{path}: {what}: expected a file, got a folder")
    try:
        if suffix == "npy":
            arrays = {what: np.load(path, allow_pickle=False)}
        elif suffix == "npz":
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        elif suffix == "pt":
            obj = torch.load(path, map_location="cpu", weights_only=True)
            arrays = obj if isinstance(obj, dict) else {what: obj}
        else:
            from ._safetensors import Checkpoint

            with Checkpoint(path) as c:
                arrays = {name: c.read(name).view(info.shape) for name, info in c.tensors.items()}
    except FileNotFoundError:
        raise CLIError(f"{path}: {what}: no such file") from None
    except OSError as e:
        raise CLIError(f"{path}: {what}: cannot read: {e.strerror or e}") from None
    except pickle.UnpicklingError as e:  # torch.load(weights_only=True): not a file of tensors
        # torch's message: advice to load with weights_only=False (not for untrusted files), the
        # cause, a pointer to its documentation. Only the cause is kept.
        lines = [line.replace("WeightsUnpickler error:", "").strip() for line in str(e).splitlines()[1:]]
        detail = next((line for line in lines if line and not line.startswith(("Please file", "Check the doc"))), "")
        raise CLIError(f"{path}: cannot read as .pt: expected tensors saved by torch.save (pickled Python objects "
                       f"are not loaded){': ' + detail if detail else ''}") from None
    except Exception as e:  # each format's own errors: corrupt archives, refused pickles, bad headers
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if "Object arrays cannot be loaded" in first:
            first = "an array of Python objects (dtype object), which is not loaded; expected numbers"
        raise CLIError(f"{path}: cannot read as .{suffix}: {first}") from None
    if what in arrays:
        x = arrays[what]
    elif len(arrays) == 1:
        x = next(iter(arrays.values()))
    else:
        raise CLIError(f"{path}: holds {sorted(map(str, arrays))[:10]}; name the array {what!r} or keep one per file")
    expected = "integer class ids (or real targets)" if what == "labels" else "real numbers"
    if isinstance(x, np.ndarray):
        if x.dtype.kind in "US":
            hint = ": map the classes to integers 0..C-1 first" if what == "labels" else ""
            raise CLIError(f"{path}: {what}: expected {expected}, got strings (dtype {x.dtype}){hint}")
        if x.dtype.kind not in "biuf":
            raise CLIError(f"{path}: {what}: expected {expected}, got dtype {x.dtype}")
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise CLIError(f"{path}: {what}: expected an array of {expected}, got {type(x).__name__}")
    if x.is_complex() or x.is_quantized:
        raise CLIError(f"{path}: {what}: expected {expected}, got {x.dtype}")
    return x


RANK_SCORES = ("logme", "hscore", "hscore_shrinkage", "gbc", "transrate", "sfda", "tmi")
# What --models can stream (transferability_stats.STREAMED, spelled out: --help imports no torch).
MODEL_SCORES = ("logme", "hscore", "hscore_shrinkage", "gbc", "gbc_log", "transrate", "etran", "ncti")


def _writable(path: str | None, flag: str) -> None:
    """Refuse an output that cannot be written before any scoring starts."""
    if path is None:
        return
    p = Path(path)
    folder = p.parent
    if p.is_dir():
        raise CLIError(f"{path}: {flag}: cannot write: it is a folder; expected a file name")
    if not folder.is_dir():
        raise CLIError(f"{path}: {flag}: cannot write: folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise CLIError(f"{path}: {flag}: cannot write: permission denied")


def _write(path: str, flag: str, fill) -> None:
    """``fill(file)`` into a temporary file created exclusively beside ``path``, then renamed
    over it: no half-written output, and a symlink at ``path`` is replaced, not followed."""
    import tempfile

    p = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w", newline="") as f:
            fill(f)
        os.replace(tmp, p)
    except OSError as e:
        if tmp is not None and os.path.lexists(tmp):
            os.unlink(tmp)
        raise CLIError(f"{path}: {flag}: cannot write: {e.strerror or e}") from None


def _read_labels(labels_path: str, regression: bool):
    """The labels file's class ids [N] (or real targets with ``regression``), checked as the
    scores check them, every mistake blamed on the file."""
    from . import transferability as tr

    labels = _load_array(labels_path, "labels")
    shape = tuple(labels.shape)
    if regression and labels.dim() not in (1, 2):
        raise CLIError(f"{labels_path}: labels: expected regression targets [N] or [N, K], got shape {shape}")
    if not regression:
        if labels.dim() == 2 and shape[1] == 1:
            labels = labels[:, 0]
        elif labels.dim() != 1:
            hint = " (real targets [N, K] need --regression)" if labels.dim() == 2 else ""
            raise CLIError(f"{labels_path}: labels: expected class ids [N], got shape {shape}{hint}")
    N = int(shape[0]) if shape else 0
    if N < 2:
        raise CLIError(f"{labels_path}: labels: expected at least 2 labels, got {N}")
    try:
        tr._targets(labels, N, regression)  # the scores' own checks, blamed on the labels file
    except (ValueError, TypeError) as e:
        raise CLIError(f"{labels_path}: {e}") from None
    return labels, N


def _rank_features(args) -> int:
    """Rank models by their saved features: one [N, D] file per model."""
    import json

    import torch

    from . import _dist

    wanted = args.scores or (["logme"] if args.regression else list(RANK_SCORES))
    if args.regression and set(wanted) - {"logme"}:
        raise CLIError("with --regression only logme applies")
    if not args.features:
        raise CLIError("expected feature files (one per model) or --models")
    if args.labels is None:
        raise CLIError("--labels is required: the class ids of the N samples")
    if args.data is not None:
        raise CLIError("--data goes with --models; feature files hold the models' outputs already")
    group = _joined("cpu")
    names = [Path(p).name for p in args.features]
    if len(set(names)) < len(names):  # same file name in different folders: show the paths
        names = list(args.features)

    def work():
        _writable_outputs(args, group)
        labels, N = _read_labels(args.labels, args.regression)
        owner = _dist.split_balanced([_bytes(p) for p in args.features], _dist.world(group))
        return [(i, *_score_file(args, path, model, labels, N, wanted))
                for i, (path, model) in enumerate(zip(args.features, names)) if owner[i] == _dist.rank(group)]

    scored = sorted(t for part in _gathered(group, work) for t in part)  # (file index, row, NCTI terms)
    rows = [row for _, row, _ in scored]
    if "ncti" in wanted:
        from . import transferability_collapse as tc

        for row, value in zip(rows, tc.ncti_combine(torch.stack([t for _, _, t in scored])).tolist()):
            row["ncti"] = value
    rows.sort(key=lambda r: -r[wanted[0]])

    def output():
        width = max(len(r["model"]) for r in rows)
        print(f"{'rank':>4}  {'model':<{width}}  " + "  ".join(f"{n:>16} {'time':>8}" for n in wanted))
        for i, r in enumerate(rows, 1):
            print(f"{i:>4}  {r['model']:<{width}}  "
                  + "  ".join(f"{r[n]:>16.6g} {r[n + '_s'] * 1e3:>6.0f}ms" for n in wanted))
        if args.json:
            _write(args.json, "--json", lambda f: f.write(json.dumps(rows, indent=1)))
        if args.csv:
            import csv

            def fill(f):
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)

            _write(args.csv, "--csv", fill)

    _on_first(group, output)
    return 0


def _score_file(args, path: str, model: str, labels, N: int, wanted) -> tuple[dict, object]:
    """(the table row of one features file: every score and its time, NCTI's raw terms [3] or
    None); NCTI normalizes over every file once all are scored."""
    import time

    import torch

    from . import transferability as tr
    from . import transferability_collapse as tc

    feats = _load_array(path, "features")
    if feats.dim() != 2:
        raise CLIError(f"{path}: features: expected [N, D] (one model per file), got shape {tuple(feats.shape)}")
    n, D = (int(s) for s in feats.shape)
    if n != N:
        raise CLIError(f"{path}: features: {n} rows, but {args.labels} holds {N} labels (expected one per row)")
    if D < 1:
        raise CLIError(f"{path}: features: expected at least 1 feature, got shape {(n, D)}")
    if feats.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        feats = feats.double()  # integer, bool or float8 features: their values as numbers
    # One float64 reduction clears finite features whose sums of squares and of fourth powers
    # (the Ledoit-Wolf shrinkage's) stay within float64: |F|^4 < 1e300.
    if not float(torch.linalg.vector_norm(feats, dtype=torch.float64)) < 1e75:
        bad = ~torch.isfinite(feats)
        count = int(bad.sum())
        if count:
            i, j = (int(k) for k in bad.nonzero()[0])
            raise CLIError(f"{path}: features: expected finite values, found NaN or Inf in {count} "
                           f"entr{'y' if count == 1 else 'ies'} (the first at row {i}, column {j})")
        raise CLIError(f"{path}: features: values too large (largest magnitude {float(feats.abs().max()):.3g}; "
                       "the scores sum their squares and fourth powers in float64): rescale them")
    classes = None if args.regression else tr._class_labels(labels, N)[1]
    terms = []

    def ncti_of(f) -> float:
        terms.append(tc.ncti([f], classes, return_terms=True)[1][0])
        return math.nan

    scorers = {"logme": lambda f: tr.logme(f, labels, regression=args.regression, compat=args.compat),
               "hscore": lambda f: tr.hscore(f, labels), "hscore_shrinkage": lambda f: tr.hscore(f, labels, shrinkage=True),
               "gbc": lambda f: tr.gbc(f, labels), "gbc_log": lambda f: tr.gbc(f, labels, log=True),
               "transrate": lambda f: tr.transrate(f, labels), "sfda": lambda f: tr.sfda(f, labels),
               "tmi": lambda f: tr.tmi(f, labels), "etran": lambda f: tc.etran(f),
               "ncti": ncti_of}
    row = {"model": model, "N": n, "D": D}
    for name in wanted:
        t0 = time.perf_counter()
        try:
            row[name] = float(scorers[name](feats))
        except (ValueError, TypeError) as e:
            blamed = args.labels if str(e).startswith("labels") else path
            raise CLIError(f"{blamed}: {name}: {e}") from None
        except torch.linalg.LinAlgError as e:  # a solver that the features defeat (extreme scale, say)
            raise CLIError(f"{path}: {name}: features: {str(e).splitlines()[0]}") from None
        row[f"{name}_s"] = time.perf_counter() - t0
    return row, (terms[0] if terms else None)


# ---- under torchrun: the candidates split over the ranks ------------------------------------------


def _joined(device):
    """The process group when run by ``torchrun`` (None on its own), this process announced to
    it so that a peer can tell when it dies."""
    from . import _dist

    group = _dist.process_group(device)
    _dist.announce(group)
    return group


def _bytes(path: str) -> int:
    """The balance weight of a candidate: a features file's size, or a model folder's weights'
    (its forward passes dominate); 1 where unknown (a cached model's name, a missing file),
    whose owner then reports the error."""
    p = Path(path)
    try:
        if p.is_dir():
            return max(1, sum(f.stat().st_size for f in p.iterdir() if f.suffix in (".safetensors", ".bin")))
        return max(1, p.stat().st_size)
    except OSError:
        return 1


def _gathered(group, work) -> list:
    """Every rank's result of ``work()`` (its share of the candidates), in rank order; a failure
    on any rank raises RankFailure on all (the CLI's ``error: rank N failed: ...``)."""
    from . import _dist

    return _dist.gather_objects(_dist.agreed(group, work), group)


def _on_first(group, output) -> None:
    """``output()`` (the table and the files) on the first rank only; its failure fails all."""
    from . import _dist

    _dist.agreed(group, lambda: output() if _dist.rank(group) == 0 else None)


def _writable_outputs(args, group) -> None:
    """Refuse, before any scoring, outputs that the first rank (which writes them) cannot write."""
    from . import _dist

    if _dist.rank(group) == 0:
        _writable(args.json, "--json")
        _writable(args.csv, "--csv")


MAX_DATA_BYTES = 1 << 30  # a data file larger than this is refused before it is read


def _jsonl(path: str, lines: list[str]) -> tuple[list[str], list | None]:
    """Texts and labels of .jsonl lines: an object per line with "text" and, optionally, an
    integer "label" (on every line or on none)."""
    import json

    texts, labels = [], []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CLIError(f"{path}: data: line {i}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise CLIError(f"{path}: data: line {i}: expected an object with a string 'text'")
        texts.append(row["text"])
        labels.append(row.get("label"))
    if all(v is None for v in labels):
        return texts, None
    for i, v in enumerate(labels):
        if isinstance(v, bool) or not isinstance(v, int):
            raise CLIError(f"{path}: data: sample {i}: expected an integer 'label' on every line, got {v!r}")
    return texts, labels


def _read_data(path: str):
    """The target inputs: texts (.txt, one per line; .jsonl, see _jsonl) or an array file of
    token ids / inputs [N, ...]. Returns (data, the labels the file holds or None)."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        return _load_array(path, "data"), None
    try:
        if os.path.getsize(p) > MAX_DATA_BYTES:
            raise CLIError(f"{path}: data: larger than {MAX_DATA_BYTES >> 20} MiB; pass fewer samples")
        # Lines end at \n only: JSON and text may hold U+2028, form feeds and the like.
        lines = [line.removesuffix("\r") for line in p.read_text(encoding="utf-8").split("\n")]
    except FileNotFoundError:
        raise CLIError(f"{path}: data: no such file") from None
    except IsADirectoryError:
        raise CLIError(f"{path}: data: expected a file, got a folder") from None
    except UnicodeDecodeError as e:
        raise CLIError(f"{path}: data: expected UTF-8 text, got byte {e.object[e.start]:#x} at offset {e.start}") from None
    texts, labels = ([line for line in lines if line.strip()], None) if suffix == ".txt" else _jsonl(path, lines)
    if len(texts) < 2:
        raise CLIError(f"{path}: data: expected at least 2 samples, got {len(texts)}")
    return texts, labels


def _layers(text: str):
    if text in ("last", "all", "mean"):
        return text
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise CLIError(f"--layers: expected last, all, mean or comma-separated indices, got {text!r}") from None


def _rank_models(args) -> int:
    """Rank models by running them over the data (rank_models), every layer asked for."""
    import torch

    from . import _dist
    from .transferability_models import candidate_rows, ranked

    if args.features:
        raise CLIError("give feature files or --models, not both")
    if args.data is None:
        raise CLIError("--models needs --data (the target inputs)")
    if args.regression:
        raise CLIError("--models ranks classification tasks; --regression takes feature files")
    scores = args.scores or ["logme", "hscore", "gbc_log"]
    unknown = [s for s in scores if s not in MODEL_SCORES]
    if unknown:
        raise CLIError(f"--scores: with --models, expected scores among {list(MODEL_SCORES)}, got {unknown} "
                       "(those need every sample's features: save features and rank the files)")
    layers = _layers(args.layers)
    try:
        device = torch.device(args.device)
        if device.type == "cuda" and device.index is None:  # under torchrun: each rank its own GPU
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:  # a device torch has no backend or no such index for
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CLIError(f"--device: expected cpu, cuda or cuda:N that torch can use here, got {args.device!r}: "
                       f"{first}") from None
    for value, flag in ((args.batch_size, "--batch-size"), (args.max_length, "--max-length")):
        if value < 1:
            raise CLIError(f"{flag}: expected a positive integer, got {value}")
    group = _joined(device)
    leader = _dist.rank(group) == 0
    names = [Path(m).name or m for m in args.models]
    if len(set(names)) < len(names):  # the same folder name in two places: show the paths
        names = list(args.models)
    if args.quiet or not leader:  # transformers' own loading bars too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

    def work():
        _writable_outputs(args, group)
        data, labels = _data_and_labels(args)
        owner = _dist.split_balanced([_bytes(m) for m in args.models], _dist.world(group))
        mine = {name: m for i, (name, m) in enumerate(zip(names, args.models)) if owner[i] == _dist.rank(group)}
        if not mine:
            return {}
        try:  # the models load one at a time, when their turn comes
            rows, terms = candidate_rows(mine, data, labels, scores=scores, layers=layers, pooling=args.pooling,
                                         batch_size=args.batch_size, max_length=args.max_length, compat=args.compat,
                                         device=device, progress=leader and not args.quiet, backend="auto")
        except torch.OutOfMemoryError:
            raise CLIError(f"out of memory on {args.device}: lower --batch-size or --max-length, or rank fewer "
                           "layers (each keeps a D x D matrix; transrate C of them)") from None
        terms = [t.cpu() for t in terms] or [None] * len(rows)
        return _by_model(rows, terms)

    scored = {}
    for part in _gathered(group, work):
        scored.update(part)
    rows = [pair for name in names for pair in scored[name]]  # (row, NCTI terms) in the models' order
    result = ranked(tuple(scores), [row for row, _ in rows], [t for _, t in rows if t is not None])

    def output():
        print(result.table())
        if args.json:
            _write(args.json, "--json", lambda f: f.write(result.to_json()))
        if args.csv:
            _write(args.csv, "--csv", lambda f: f.write(result.to_csv()))

    _on_first(group, output)
    return 0


def _by_model(rows: list, terms: list) -> dict:
    """{model: [(row, its NCTI terms or None)]}, the rows of each model in their order."""
    out: dict = {}
    for row, t in zip(rows, terms):
        out.setdefault(row["model"], []).append((row, t))
    return out


def _data_and_labels(args) -> tuple:
    """--data's inputs and their labels (from --labels, or the .jsonl), checked to match."""
    import torch

    data, file_labels = _read_data(args.data)
    if args.labels is not None:
        labels, N = _read_labels(args.labels, False)
        where = args.labels
    elif file_labels is not None:
        try:
            labels, N, where = torch.tensor(file_labels), len(file_labels), args.data
        except (RuntimeError, OverflowError):
            raise CLIError(f"{args.data}: data: a 'label' does not fit in 64 bits") from None
    else:
        raise CLIError(f"{args.data}: data: holds no labels; give --labels")
    n = len(data) if isinstance(data, list) else int(data.shape[0])
    if n != N:
        raise CLIError(f"{args.data}: data: {n} samples, but {where} holds {N} labels (expected one per sample)")
    return data, labels


def _rank(args) -> int:
    return _rank_models(args) if args.models else _rank_features(args)


def add_parser(sub) -> None:
    rank_description = """\
Rank candidate pretrained models for a labeled target task without fine-tuning
any. Each FEATURES file holds what one model gives on the N target inputs,
[N, D]; --labels holds their N class ids (or real targets [N] or [N, K] with
--regression). Every score is computed for every model and the table, with the
time each score took, is sorted by the first one. Higher is better for every
score.

scores (all but logme need class ids, at least two classes):
  logme             LogME (You et al. 2021): class ids, or real targets with
                    --regression (the only score that takes them); --compat
                    official gives the numbers of the official code
  hscore            H-score (Bao et al. 2019)
  hscore_shrinkage  H-score with Ledoit-Wolf shrinkage (Ibrahim et al. 2023),
                    for few samples per feature
  gbc               GBC (Pandy et al. 2022) on the raw features: the paper
                    first reduces them to 64 dimensions with PCA, which this
                    command does not do; pass reduced features for that
  transrate         TransRate (Huang et al. 2022)
  sfda              SFDA (Shao et al. 2022): features that vary within each
                    class; costs O(N D^2 + D^3) per model
  tmi               TMI (Xu & Kang 2023): a class of more than 3 samples;
                    costs O(sum_c n_c^2 D); it rewards within-class spread,
                    noise included

With --models the models themselves run over --data: each model's chosen layers
(--layers) are pooled over the tokens (--pooling) and streamed into the scores,
so no feature array is held (see transferops.rank_models). The scores there are
logme, hscore, hscore_shrinkage, gbc, gbc_log (GBC as -log(-GBC): the same order,
no underflow to -0 on wide features), transrate, etran (ETran's energy score)
and ncti (NCTI, normalized over all candidates; runs each model twice). The
table lists each model's best layer by the first score; --json and --csv hold
every layer.

A mistake in a file (its shape or dtype, NaN, labels that do not match the
features) is one error line naming the file, and exit status 2.

Under torchrun (torchrun --standalone --nproc-per-node 2 --no-python transferops
rank ...) the files or models are split over the processes, balanced by their
bytes; the first prints the table and writes --json/--csv. If one fails, all
exit with status 2 and "error: rank N failed: ..."."""

    p = sub.add_parser("rank", help="rank candidate models' features for a labeled target task by transferability",
                       description=rank_description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("features", nargs="*", help="one file per model: [N, D] features (.npy .npz .pt .safetensors; "
                   "an array named 'features' or the only one)")
    p.add_argument("--labels", help="class ids [N] (or real targets [N] or [N, K] with --regression), same formats "
                   "(an array named 'labels' or the only one); with --models, optional when --data is .jsonl "
                   "with labels")
    p.add_argument("--scores", nargs="+", choices=sorted(set(RANK_SCORES) | set(MODEL_SCORES)), metavar="SCORE",
                   help="scores to compute, of those above (default: all that apply to files; logme hscore gbc_log "
                   "with --models); the first sorts")
    m = p.add_argument_group("ranking models (instead of feature files)")
    m.add_argument("--models", nargs="+", metavar="DIR_OR_NAME",
                   help="local transformers folders (or names in the local Hugging Face cache; nothing is downloaded)")
    m.add_argument("--data", metavar="FILE", help="the N target inputs: .txt (one text per line), .jsonl ('text' "
                   "and 'label' per line), or token ids [N, T] in an array file")
    m.add_argument("--layers", default="last", help="last (default), all, mean (their average) or indices into the "
                   "hidden states, e.g. --layers=-1,-4 (0 is the embeddings)")
    m.add_argument("--pooling", choices=["mean", "cls", "last"], default="mean",
                   help="over the tokens: mean over the attention mask (default), the first, or the last token")
    m.add_argument("--batch-size", type=int, default=32, help="samples per forward pass (default 32)")
    m.add_argument("--max-length", type=int, default=128, help="tokens kept per text (default 128)")
    m.add_argument("--device", default="cpu", help="where the models run: cpu (default), cuda, cuda:1, ...")
    m.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--regression", action="store_true", help="labels are real-valued targets (LogME only)")
    p.add_argument("--compat", choices=["corrected", "official"], default="corrected",
                   help="LogME: corrected (default) or the official code's scores, defect included")
    p.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    p.add_argument("--csv", metavar="FILE", help="also write the table as CSV")
    p.set_defaults(func=_rank)
