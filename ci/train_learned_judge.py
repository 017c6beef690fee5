"""Train the learned refusal judge (pytest_sftsafety/judges/learned_v1.json) and report its agreement.

Model: L2-regularised logistic regression over the judge's hand-designed features (each in [0, 1]) and
signed hashed word n-grams (feature hashing, Weinberger et al. 2009); see pytest_sftsafety/judges/learned.py.
The intercept is barely penalised (1e-3). The fit is Newton's method in the n-dimensional dual (Hessian
inverted through the Woodbury identity), which reaches the unique optimum of this strictly convex problem to
machine precision; the weights are then rounded (hand weights to 1e-6, hashed weights to multiples of 1e-4,
zeros dropped), so the file is byte-identical from run to run: there are no random numbers (folds are
assigned by a hash of each row's text), n-gram sums do not depend on set order, OpenBLAS runs single-threaded,
and platform-dependent last bits do not survive rounding.

Data: XSTest's human-labelled completions of two models (../shared/data/xstest_dev, read in place, never
copied; 1_full_compliance and 3_partial_refusal -> 1, 2_full_refusal -> 0) and the project-written
examples in ci/judge_training/examples.jsonl (refusals, partial refusals that go on to answer, and answers,
in many assistants' manners). Hashed n-grams seen in fewer than two training answers are not used.

Hyper-parameters: the two L2 strengths (hand block, hashed block) are picked from a fixed 3 x 3 grid by
5-fold stratified cross-validation (lowest out-of-fold log loss; ties go to the stronger penalty) inside the
training rows only. The held-out evaluation repeats the whole procedure, selection included, on one XSTest
file plus the project examples and scores the other XSTest file, which it never sees. The shipped model is
selected and fitted the same way on both files plus the examples. The table also gives a 5-fold out-of-fold
score on all 900 XSTest rows (each fold scored by a fit without it, at the shipped hyper-parameters).

Usage: python ci/train_learned_judge.py [--check] [--out PATH] [--shared DIR]
  --check  retrain and exit 1 if the result differs from the weights at --out (nothing is written)
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
import scipy.sparse

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing it

from pytest_sftsafety.judges.keyword import KeywordJudge  # noqa: E402
from pytest_sftsafety.judges.learned import (  # noqa: E402
    FEATURE_NAMES,
    WEIGHTS,
    LearnedJudge,
    hand_features,
    hashed_features,
)
from pytest_sftsafety.tools.agreement import LabelledRow, agreement, read_labels  # noqa: E402

SHARED = ROOT.parent / "shared"
XSTEST_FILES = {"gpt4": "xstest_v2_completions_gpt4.csv", "llama2orig": "xstest_v2_completions_llama2orig.csv"}
EXAMPLES = ROOT / "ci" / "judge_training" / "examples.jsonl"
HASH_BITS = 18
MIN_DF = 2  # an n-gram seen in one training answer only is memorisation, not evidence
BIAS_L2 = 1e-3  # next to no pull on the intercept
GRID_HAND = (0.1, 0.3, 1.0)
GRID_HASH = (0.3, 1.0, 3.0)
FOLDS = 5
HASH_STEP = 1e-4  # hashed weights are stored as integer multiples of this


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run the enclosed code with single-threaded OpenBLAS, also when numpy was imported before this module
    (as under pytest). Several BLAS threads make these small factorisations slower on a busy machine (they
    spin against each other and against torch's OpenMP pool); OpenBLAS's thread-local setting is restored
    afterwards. Linux only (the libraries are found in /proc/self/maps); elsewhere it does nothing."""
    try:
        maps = Path("/proc/self/maps").read_text(encoding="utf-8", errors="replace")
    except OSError:
        maps = ""
    paths = sorted({line.split()[-1] for line in maps.splitlines()
                    if "openblas" in line.lower() and line.split()[-1].startswith("/")})
    restore = []
    for path in paths:
        try:
            setter = ctypes.CDLL(path).openblas_set_num_threads_local
        except (OSError, AttributeError):
            continue
        setter.argtypes, setter.restype = [ctypes.c_int], ctypes.c_int
        restore.append((setter, setter(1)))
    try:
        yield
    finally:
        for setter, previous in reversed(restore):
            setter(previous)


@dataclass(frozen=True)
class Hyper:
    l2_hand: float
    l2_hash: float


@dataclass(frozen=True)
class Features:
    hand: np.ndarray  # n x len(FEATURE_NAMES), each in [0, 1]
    hashed: scipy.sparse.csr_matrix  # n x 2**HASH_BITS
    labels: np.ndarray
    keys: np.ndarray  # sha256 of each row's text: what the fold split sorts by


def featurize(rows: list[LabelledRow]) -> Features:
    keyword = KeywordJudge()
    hand = np.array([hand_features(r.prompt, r.response, keyword) for r in rows], dtype=float)
    indptr, indices, values = [0], [], []
    for r in rows:
        items = sorted(hashed_features(r.response, HASH_BITS).items())  # sorted: no dict-order dependence
        indices.extend(b for b, _ in items)
        values.extend(v for _, v in items)
        indptr.append(len(indices))
    hashed = scipy.sparse.csr_matrix((np.array(values, float), np.array(indices, np.int64), np.array(indptr)),
                                     shape=(len(rows), 1 << HASH_BITS))
    keys = np.array([hashlib.sha256(f"{r.prompt}\0{r.response}".encode()).hexdigest() for r in rows])
    return Features(hand, hashed, np.array([r.label for r in rows], dtype=float), keys)


def _subset(f: Features, index: np.ndarray) -> Features:
    return Features(f.hand[index], f.hashed[index], f.labels[index], f.keys[index])


def _concat(a: Features, b: Features) -> Features:
    return Features(np.vstack([a.hand, b.hand]), scipy.sparse.vstack([a.hashed, b.hashed]).tocsr(),
                    np.concatenate([a.labels, b.labels]), np.concatenate([a.keys, b.keys]))


def _newton_dual(kernel: np.ndarray, y: np.ndarray, start: np.ndarray | None = None, tol: float = 1e-13,
                 max_iter: int = 100) -> np.ndarray:
    """Dual coefficients a of min_w sum log-loss(y, x.w) + 1/2 w' L w with w = L^-1 X' a (kernel = X L^-1 X').

    Newton's method with the Hessian inverted through Woodbury's identity, in n dimensions, with
    backtracking; the problem is strictly convex so this reaches the unique optimum."""
    n = len(y)
    a = np.zeros(n) if start is None else start.copy()

    def objective(a: np.ndarray) -> float:
        f = kernel @ a
        return float(np.sum(np.logaddexp(0.0, f) - y * f) + 0.5 * a @ f)

    current = objective(a)
    for _ in range(max_iter):
        f = kernel @ a
        p = 0.5 * (1.0 + np.tanh(0.5 * f))  # the logistic function without overflow
        r = p - y + a
        s = np.sqrt(p * (1.0 - p))
        m = np.eye(n) + s[:, None] * kernel * s[None, :]
        factor = scipy.linalg.cho_factor(m, check_finite=False)
        step = -(r - s * scipy.linalg.cho_solve(factor, s * (kernel @ r), check_finite=False))
        decrement = -float(r @ kernel @ step)  # Newton decrement: predicted decrease x 2
        if decrement < tol * max(1.0, abs(current)):
            return a + step  # quadratic convergence: this last full step leaves a negligible error
        t = 1.0
        while True:
            candidate = objective(a + t * step)
            if candidate <= current - 0.25 * t * decrement or t < 1e-10:
                break
            t *= 0.5
        a, current = a + t * step, candidate
    return a


@dataclass(frozen=True)
class _Gram:
    """What a fit needs that does not depend on the hyper-parameters (computed once per training set)."""

    features: Features
    keep: np.ndarray  # hashed columns seen in at least MIN_DF training answers
    hashed: scipy.sparse.csr_matrix
    gram_hand: np.ndarray
    gram_hash: np.ndarray


def _gram(f: Features) -> _Gram:
    df = np.asarray((f.hashed != 0).sum(axis=0)).ravel()
    keep = np.flatnonzero(df >= MIN_DF)
    hashed = f.hashed[:, keep].tocsr()
    # Hand features are already in [0, 1], so one penalty suits all of them.
    return _Gram(f, keep, hashed, f.hand @ f.hand.T, (hashed @ hashed.T).toarray())


def fit(f: Features, hyper: Hyper) -> dict:
    """The model as the JSON-ready dict the judge loads; rounding makes it reproducible to the byte."""
    return _fit(_gram(f), hyper)[0]


def _fit(g: _Gram, hyper: Hyper, start: np.ndarray | None = None, tol: float = 1e-13) -> tuple[dict, np.ndarray]:
    kernel = g.gram_hand / hyper.l2_hand + g.gram_hash / hyper.l2_hash + 1.0 / BIAS_L2
    a = _newton_dual(kernel, g.features.labels, start, tol)
    hand_w = np.round(g.features.hand.T @ a / hyper.l2_hand, 6)
    hash_w = np.rint(np.asarray(g.hashed.T @ a).ravel() / hyper.l2_hash / HASH_STEP).astype(np.int64)
    nonzero = hash_w != 0
    buckets = g.keep[nonzero]
    return {
        "model": "logistic regression, L2, hashed n-grams (Weinberger et al. 2009) + hand features",
        "features": list(FEATURE_NAMES),
        "hash_bits": HASH_BITS,
        "hyper": {"l2_hand": hyper.l2_hand, "l2_hash": hyper.l2_hash, "l2_bias": BIAS_L2, "min_df": MIN_DF},
        "threshold": 0.5,
        "bias": round(float(a.sum() / BIAS_L2), 6),
        "hand_weights": hand_w.tolist(),
        "hash_step": HASH_STEP,
        "hash_buckets": np.diff(buckets, prepend=0).tolist(),  # delta-encoded, ascending
        "hash_weights": hash_w[nonzero].tolist(),
    }, a


def dumps(model: dict) -> str:
    return json.dumps(model, separators=(",", ":"), sort_keys=False) + "\n"


def judge_of(model: dict) -> LearnedJudge:
    return LearnedJudge.from_bytes(dumps(model).encode())


def _folds(f: Features, k: int = FOLDS) -> list[np.ndarray]:
    """Stratified folds: each class in the order of its rows' text hashes, dealt out in turn. No random
    numbers, and the split does not depend on the order of the rows."""
    folds: list[list[int]] = [[] for _ in range(k)]
    for cls in (0.0, 1.0):
        members = sorted(np.flatnonzero(f.labels == cls).tolist(), key=lambda i: (f.keys[i], i))
        for position, index in enumerate(members):
            folds[position % k].append(index)
    return [np.array(sorted(fold)) for fold in folds]


def _log_loss(model: dict, f: Features) -> float:
    z = model_logits(model, f)
    return float(np.mean(np.logaddexp(0.0, z) - f.labels * z))


def model_logits(model: dict, f: Features) -> np.ndarray:
    """Logits of a fitted model on featurised rows (the same arithmetic as the judge, vectorised)."""
    w = np.zeros(1 << HASH_BITS)
    w[np.cumsum(np.array(model["hash_buckets"], dtype=np.int64))] = np.array(model["hash_weights"]) * model["hash_step"]
    return model["bias"] + f.hand @ np.array(model["hand_weights"]) + f.hashed @ w


def select(f: Features) -> Hyper:
    """The grid point with the lowest out-of-fold log loss (ties: the stronger regularisation)."""
    grid = [Hyper(l2_hand, l2_hash) for l2_hand in GRID_HAND for l2_hash in GRID_HASH]
    losses = dict.fromkeys(grid, 0.0)
    for test in _folds(f):
        g = _gram(_subset(f, np.setdiff1d(np.arange(len(f.labels)), test)))
        a = None  # each grid point starts Newton from the previous optimum: same optimum, fewer steps
        for hyper in grid:
            model, a = _fit(g, hyper, a, tol=1e-9)  # ample for comparing losses that differ by ~1e-3
            losses[hyper] += _log_loss(model, _subset(f, test)) * len(test) / len(f.labels)
    return min(losses, key=lambda h: (round(losses[h], 9), -h.l2_hand, -h.l2_hash))


def select_and_fit(rows: list[LabelledRow]) -> tuple[dict, Hyper]:
    f = featurize(rows)
    hyper = select(f)
    return fit(f, hyper), hyper


def load(shared: Path = SHARED) -> tuple[dict[str, list[LabelledRow]], list[LabelledRow]]:
    """XSTest's two labelled files (by model) and the project-written examples."""
    folder = shared / "data" / "xstest_dev"
    missing = [name for name in XSTEST_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise SystemExit(f"{folder}: missing {', '.join(missing)}; put ../shared beside the checkout or pass --shared")
    xstest = {tag: read_labels(folder / name) for tag, name in XSTEST_FILES.items()}
    return xstest, read_labels(EXAMPLES)


def train(shared: Path = SHARED) -> dict:
    """The shipped model: hyper-parameters by cross-validation, then a fit, on all allowed rows."""
    xstest, examples = load(shared)
    with one_blas_thread():
        return select_and_fit(xstest["gpt4"] + xstest["llama2orig"] + examples)[0]


def _row(name: str, human: list[int], judged: list[int]) -> str:
    a = agreement(human, judged)
    return f"| {name} | {len(human)} | {a.kappa:.3f} | {a.accuracy:.3f} | {a.sensitivity:.3f} | {a.specificity:.3f} |"


def _scores(judge: KeywordJudge | LearnedJudge, rows: list[LabelledRow]) -> list[int]:
    return judge.score([r.prompt for r in rows], [r.response for r in rows])


def report(model: dict, hyper: Hyper, xstest: dict[str, list[LabelledRow]], examples: list[LabelledRow]) -> str:
    """The Markdown agreement table: in-sample, cross-validated, and held out by model."""
    keyword, judge = KeywordJudge(), judge_of(model)
    all_rows = xstest["gpt4"] + xstest["llama2orig"]
    human = [r.label for r in all_rows]
    # Out-of-fold on the 900 rows: each fold is scored by a fit (shipped hyper-parameters) without it.
    f_all, f_ex = featurize(all_rows), featurize(examples)
    oof = np.zeros(len(all_rows))
    for test in _folds(f_all):
        f_train = _concat(_subset(f_all, np.setdiff1d(np.arange(len(all_rows)), test)), f_ex)
        oof[test] = model_logits(fit(f_train, hyper), _subset(f_all, test))
    lines = ["| judge: data | n | kappa | accuracy | sensitivity | specificity |", "|---|---|---|---|---|---|",
             _row("keyword-v1: all XSTest rows", human, _scores(keyword, all_rows)),
             _row(f"{judge.id} (shipped): all XSTest rows, in-sample", human, _scores(judge, all_rows)),
             _row("learned: all XSTest rows, 5-fold out-of-fold", human, (oof >= 0).astype(int).tolist())]
    for train_tag, test_tag in (("gpt4", "llama2orig"), ("llama2orig", "gpt4")):
        held, held_hyper = select_and_fit(xstest[train_tag] + examples)
        test_rows = xstest[test_tag]
        labels = [r.label for r in test_rows]
        lines.append(_row(f"keyword-v1: {test_tag}", labels, _scores(keyword, test_rows)))
        lines.append(_row(f"learned, trained on {train_tag} + examples (l2 {held_hyper.l2_hand:g}/"
                          f"{held_hyper.l2_hash:g}): held-out {test_tag}", labels, _scores(judge_of(held), test_rows)))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="retrain; fail if the shipped weights differ")
    parser.add_argument("--out", type=Path, default=WEIGHTS, help=f"where to write the weights (default {WEIGHTS})")
    parser.add_argument("--shared", type=Path, default=SHARED, help="the shared folder holding data/xstest_dev")
    parser.add_argument("--readme", action="store_true", help="write the agreement table into README.md's block")
    args = parser.parse_args(argv)
    with one_blas_thread():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    xstest, examples = load(args.shared)
    model, hyper = select_and_fit(xstest["gpt4"] + xstest["llama2orig"] + examples)
    text = dumps(model)
    seconds = time.perf_counter() - started

    if args.check:
        shipped = args.out.read_text(encoding="utf-8") if args.out.is_file() else ""
        if shipped != text:
            print(f"{args.out}: differs from a fresh training run; run python ci/train_learned_judge.py",
                  file=sys.stderr)
            return 1
        print(f"{args.out}: reproduced exactly ({seconds:.1f} s)")
    else:
        args.out.write_text(text, encoding="utf-8")
        print(f"wrote {args.out}: {len(text.encode()) / 1024:.0f} kB, {len(model['hash_weights'])} hashed weights, "
              f"l2 hand {hyper.l2_hand:g}, l2 hashed {hyper.l2_hash:g}; training {seconds:.1f} s")
    table = report(model, hyper, xstest, examples)
    rows = xstest["gpt4"] + xstest["llama2orig"]
    judge = judge_of(model)
    started = time.perf_counter()
    _scores(judge, rows)
    speed = len(rows) / (time.perf_counter() - started)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from readme_blocks import publish

    publish("judge-agreement", "python ci/train_learned_judge.py --check", table + (
        f"\n\nCohen's kappa, accuracy, sensitivity (fulfilments recognised) and specificity (refusals recognised) "
        f"against the human labels of `../shared/data/xstest_dev` (GPT-4's and Llama-2-70b-chat's answers to "
        f"XSTest's 450 prompts); the learned judge scores {speed:,.0f} answers per second on one core."), args.readme)
    return 0
    args.out.write_text(text, encoding="utf-8")
    print(report(model, hyper, xstest, examples))
    print(f"\nwrote {args.out}: {len(text.encode()) / 1024:.0f} kB, {len(model['hash_weights'])} hashed weights, "
          f"l2 hand {hyper.l2_hand:g}, l2 hashed {hyper.l2_hash:g}; training {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
