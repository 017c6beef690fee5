"""How well a refusal judge agrees with human labels, and what its error rates do to measured rates.

Core module (stdlib, numpy, scipy). Labels follow SORRY-Bench: 1 = the response fulfils the request,
0 = it refuses; a judge may also answer ``UNPARSABLE``, which is counted, never taken as either label.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import DataError
from ..stats import UNPARSABLE, wilson_interval

# XSTest's human labels (Röttger et al. 2024): partial refusals still contain compliant content.
XSTEST_LABELS = {"1_full_compliance": 1, "3_partial_refusal": 1, "2_full_refusal": 0}
_WORD_LABELS = {"1": 1, "0": 0, "1.0": 1, "0.0": 0, "fulfil": 1, "fulfill": 1, "fulfilment": 1, "fulfillment": 1,
                "comply": 1, "compliance": 1, "complies": 1, "refuse": 0, "refusal": 0, "refuses": 0, "refused": 0,
                "true": 1, "false": 0, **XSTEST_LABELS}
_PROMPT_COLUMNS = ("prompt", "question", "user_prompt", "instruction")
_RESPONSE_COLUMNS = ("response", "completion", "answer", "output")
_LABEL_COLUMNS = ("label", "final_label", "human_score", "human_label", "score")


@dataclass(frozen=True)
class LabelledRow:
    prompt: str
    response: str
    label: int  # 1 = fulfilment, 0 = refusal
    source: str = ""  # the model that wrote the response, when the file says


@dataclass(frozen=True)
class Agreement:
    """A judge against human labels, over the rows the judge could score."""

    rows: int  # labelled rows read
    scored: int  # rows with a 0/1 judgment (rows - unparsable)
    unparsable: int
    kappa: float
    kappa_interval: tuple[float, float]
    accuracy: float
    sensitivity: float  # P(judge 1 | human 1): fulfilments recognised
    specificity: float  # P(judge 0 | human 0): refusals recognised
    sensitivity_interval: tuple[float, float]
    specificity_interval: tuple[float, float]
    confusion: dict[str, int]  # human_1_judge_1, human_1_judge_0, human_0_judge_1, human_0_judge_0

    def as_dict(self) -> dict:
        return asdict(self)


def _wilson(successes: int, n: int) -> tuple[float, float]:
    """Wilson score interval (Wilson 1927) of successes out of n."""
    return wilson_interval(successes / n, n) if n else (0.0, 1.0)


def cohen_kappa(human: Sequence[int], judged: Sequence[int]) -> float:
    """Cohen's kappa (Cohen 1960) for two binary raters: (p_o - p_e) / (1 - p_e)."""
    n = len(human)
    if n == 0:
        return float("nan")
    observed = sum(h == j for h, j in zip(human, judged, strict=True)) / n
    h1, j1 = sum(human) / n, sum(judged) / n
    expected = h1 * j1 + (1 - h1) * (1 - j1)
    return 1.0 if expected == 1 else (observed - expected) / (1 - expected)


def agreement(human: Sequence[int], judged: Sequence[int]) -> Agreement:
    """Kappa, accuracy, sensitivity and specificity of ``judged`` against ``human`` (unparsable
    judgments excluded and counted). The kappa interval uses Cohen's large-sample standard error,
    sqrt(p_o (1 - p_o) / (n (1 - p_e)^2)); sensitivity and specificity get Wilson intervals."""
    pairs = [(h, j) for h, j in zip(human, judged, strict=True) if j != UNPARSABLE]
    n = len(pairs)
    counts = {f"human_{h}_judge_{j}": sum(1 for p in pairs if p == (h, j)) for h in (1, 0) for j in (1, 0)}
    tp, fn = counts["human_1_judge_1"], counts["human_1_judge_0"]
    fp, tn = counts["human_0_judge_1"], counts["human_0_judge_0"]
    kappa = cohen_kappa([h for h, _ in pairs], [j for _, j in pairs])
    if n:
        p_o = (tp + tn) / n
        h1, j1 = (tp + fn) / n, (tp + fp) / n
        p_e = h1 * j1 + (1 - h1) * (1 - j1)
        se = math.sqrt(p_o * (1 - p_o) / n) / (1 - p_e) if p_e < 1 else 0.0
        interval = (max(-1.0, kappa - 1.96 * se), min(1.0, kappa + 1.96 * se))
    else:
        interval = (float("nan"), float("nan"))
    return Agreement(
        rows=len(human), scored=n, unparsable=len(human) - n, kappa=kappa, kappa_interval=interval,
        accuracy=(tp + tn) / n if n else float("nan"),
        sensitivity=tp / (tp + fn) if tp + fn else float("nan"),
        specificity=tn / (tn + fp) if tn + fp else float("nan"),
        sensitivity_interval=_wilson(tp, tp + fn), specificity_interval=_wilson(tn, tn + fp), confusion=counts)


# --- reading labelled files ---------------------------------------------------------------------


def _label(value: object, where: str) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    key = str(value).strip().lower()
    if key in _WORD_LABELS:
        return _WORD_LABELS[key]
    raise DataError(f"{where}: label {value!r} is not 0/1, fulfil/refuse, or an XSTest final_label "
                    f"(1_full_compliance, 2_full_refusal, 3_partial_refusal); fix the row or drop it")


def _first(record: dict, names: Sequence[str]) -> str | None:
    return next((name for name in names if record.get(name) not in (None, "")), None)


def _text(value: object) -> str:
    """A prompt or response: a string, or SORRY-Bench's ``turns`` list / ``choices`` structure."""
    if isinstance(value, list):
        if value and isinstance(value[0], dict):  # choices: [{"index": 0, "turns": [...]}]
            value = value[0].get("turns", [])
        return "\n\n".join(str(v) for v in value)
    return str(value)


def _records(path: Path) -> list[tuple[int, dict]]:
    from ..data import _decode, _rows_jsonl, check_rows

    raw = path.read_bytes()
    if path.suffix.lower() == ".parquet":
        from ..data import _rows_parquet

        return _rows_parquet(raw, path)
    text = _decode(raw, path)
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        return [(row_no, {k: v for k, v in row.items() if k is not None}) for row_no, row in enumerate(reader, 2)]
    if path.suffix.lower() in (".jsonl", ".json"):
        stripped = text.lstrip()
        if path.suffix.lower() == ".json" and stripped.startswith("["):
            try:
                records = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: not valid JSON ({exc.msg}); give a list of labelled objects") from None
            except RecursionError:
                raise DataError(f"{path}: JSON nested too deeply to read; give a list of flat labelled objects") \
                    from None
            check_rows(records if isinstance(records, list) else [records], path)
            return list(enumerate(records, start=1))
        return _rows_jsonl(text, path, record="labelled")
    raise DataError(f"{path}: unknown labels file type '{path.suffix}'; use .csv, .jsonl, .json or .parquet")


def _question_texts(questions: Path | None) -> dict[tuple[int, str], str]:
    if questions is None:
        return {}
    from ..data import read_rows

    texts = {}
    for row_no, record in read_rows(questions)[0]:
        if "question_id" not in record or "turns" not in record:
            raise DataError(f"{questions} row {row_no}: a question file needs question_id and turns")
        texts[(int(record["question_id"]), str(record.get("prompt_style") or "base"))] = _text(record["turns"])
    return texts


def read_labels(path: str | Path, questions: str | Path | None = None) -> list[LabelledRow]:
    """Labelled (prompt, response, label) rows from CSV, JSONL, JSON or parquet.

    Understood as they are: XSTest's completion files (``prompt``, ``completion``, ``final_label``),
    SORRY-Bench's human judgments (``question_id``, ``prompt_style``, ``model_id``, ``choices``,
    ``human_score``; prompts come from the row when it has them, else from ``questions``, SORRY-Bench's
    question file), and plain files with prompt/response/label columns (label 0/1 or refuse/fulfil)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--labels {path}: no such file; give a CSV/JSONL file of labelled responses")
    prompts = _question_texts(Path(questions) if questions else None)
    rows = []
    for row_no, record in _records(path):
        where = f"{path} row {row_no}"
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected an object with prompt, response and label fields")
        response_col = "choices" if record.get("choices") not in (None, "") else _first(record, _RESPONSE_COLUMNS)
        label_col = _first(record, _LABEL_COLUMNS)
        prompt_col = "turns" if record.get("turns") not in (None, "") else _first(record, _PROMPT_COLUMNS)
        if response_col is None or label_col is None:
            raise DataError(f"{where}: needs a response ({'/'.join(_RESPONSE_COLUMNS)} or choices) and a label "
                            f"({'/'.join(_LABEL_COLUMNS)}); found {', '.join(sorted(record)) or 'no columns'}")
        if prompt_col is not None:
            prompt = _text(record[prompt_col])
        elif record.get("question_id") not in (None, ""):
            key = (int(record["question_id"]), str(record.get("prompt_style") or "base"))
            if key not in prompts:
                hint = "pass --questions question.jsonl" if not prompts else "that question file lacks it"
                raise DataError(f"{where}: no prompt for question {key[0]} ({key[1]}); {hint}")
            prompt = prompts[key]
        else:
            raise DataError(f"{where}: needs a prompt ({'/'.join(_PROMPT_COLUMNS)} or turns)")
        value = record[label_col]
        if label_col == "human_score" and isinstance(value, (int, float)) and 0 < value < 1:
            value = int(value >= 0.5)  # averaged annotators: the majority
        source = record.get("model_id") or record.get("model") or path.stem
        rows.append(LabelledRow(prompt=prompt, response=_text(record[response_col]), label=_label(value, where),
                                source=str(source)))
    if not rows:
        raise DataError(f"{path}: no labelled rows")
    return rows
