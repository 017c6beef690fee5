"""Suites: the SORRY-Bench taxonomy (categories, domains) and validation of its prompts.

Core module: stdlib only. Reading files and the hub lives in ``data.py``.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

SUITES_DIR = Path(__file__).resolve().parent / "suites"
DEFAULT_SUITE = "sorry_bench_202503"

# The 20 linguistic mutations SORRY-Bench ships besides the base prompts.
MUTATION_STYLES = (
    "question", "slang", "uncommon_dialects", "technical_terms", "role_play", "misspellings",
    "logical_appeal", "authority_endorsement", "misrepresentation", "evidence-based_persuasion",
    "expert_endorsement", "ascii", "caesar", "morse", "atbash", "translate-fr", "translate-ml",
    "translate-mr", "translate-ta", "translate-zh-cn",
)
PROMPT_STYLES = ("base",) + MUTATION_STYLES


def temperature_label(temperature: float) -> str:
    return f"T{temperature:g}"


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


@dataclass(frozen=True)
class Category:
    id: int
    name: str
    description: str
    domain: str

    @property
    def slug(self) -> str:
        """Stable test name part, e.g. ``07_violent_crimes``."""
        return f"{self.id:02d}_{slugify(self.name)}"


CATEGORY, DOMAIN, OVERALL = "category", "domain", "overall"


@dataclass(frozen=True)
class Target:
    """One test of a run: a category, a domain or the overall rate, at one temperature."""

    kind: str  # CATEGORY, DOMAIN or OVERALL
    temperature: float = 0.0
    category_id: int | None = None
    domain: str | None = None

    @property
    def aggregate(self) -> bool:
        """A domain or the overall rate: several categories' prompts pooled."""
        return self.kind != CATEGORY

    def covers(self, category: Category) -> bool:
        return (self.kind == OVERALL or (self.kind == DOMAIN and category.domain == self.domain)
                or (self.kind == CATEGORY and category.id == self.category_id))

    def at(self, temperature: float) -> Target:
        return Target(self.kind, temperature, self.category_id, self.domain)

    def same_scope(self, other: Target) -> bool:
        """The same category, domain or overall rate, whatever the temperatures."""
        return (self.kind, self.category_id, self.domain) == (other.kind, other.category_id, other.domain)

    def as_json(self) -> list:
        return [self.kind, self.temperature, self.category_id, self.domain]

    @classmethod
    def from_json(cls, value: list) -> Target:
        kind, temperature, category_id, domain = value
        return cls(str(kind), float(temperature), None if category_id is None else int(category_id),
                   None if domain is None else str(domain))


@dataclass(frozen=True)
class Suite:
    name: str
    title: str
    release: str
    hub_dataset: str | None
    prompts_per_category: int
    domains: dict[str, str]
    categories: tuple[Category, ...]
    source: Path
    data: str | None = None
    max_fulfillment: tuple[tuple[str, float], ...] = ()  # [gates.max_fulfillment]: scope -> limit

    def category(self, category_id: int) -> Category:
        for cat in self.categories:
            if cat.id == category_id:
                return cat
        raise KeyError(category_id)

    def scope(self, name: str) -> Target | None:
        """What a scope such as ``--max-fulfillment NAME=...`` or ``--toxicity-categories NAME`` names:
        ``overall``, a domain key, or a category by id (``7``, ``07``) or name (``violent_crimes``,
        ``07_violent_crimes``), as a temperature-free ``Target``; None when it names nothing here."""
        text = str(name).strip()
        if text == "overall":
            return Target(OVERALL)
        if text in self.domains or slugify(text) in self.domains:
            return Target(DOMAIN, domain=text if text in self.domains else slugify(text))
        for cat in self.categories:
            if text.lstrip("0") == str(cat.id) or slugify(text) in (slugify(cat.name), cat.slug):
                return Target(CATEGORY, category_id=cat.id)
        return None

    def tests(self, temperatures: tuple[float, ...]) -> list[tuple[str, Target, str | None]]:
        """Every test of a run, in collection order, as (name, target, marker): each category, then each
        domain that has categories, then the overall rate, at every temperature."""
        out: list[tuple[str, Target, str | None]] = []
        for category in self.categories:
            out += [(f"{category.slug}[{temperature_label(t)}]", Target(CATEGORY, t, category_id=category.id),
                     category.domain) for t in temperatures]
        for domain in self.domains:
            if any(c.domain == domain for c in self.categories):
                out += [(f"domain_{domain}[{temperature_label(t)}]", Target(DOMAIN, t, domain=domain), domain)
                        for t in temperatures]
        out += [(f"overall[{temperature_label(t)}]", Target(OVERALL, t), None) for t in temperatures]
        return out

    def cells(self, target: Target) -> list[tuple[int, float]]:
        """The (category id, temperature) cells a test needs."""
        return [(c.id, target.temperature) for c in self.categories if target.covers(c)]

    @property
    def expected_prompts(self) -> int:
        return self.prompts_per_category * len(self.categories)


@dataclass(frozen=True)
class Prompt:
    question_id: int
    category_id: int
    text: str
    prompt_style: str = "base"

    @property
    def key(self) -> str:
        """Identity of the prompt for seeding: the same prompt gets the same samples in every run."""
        return f"{self.prompt_style}:{self.question_id}"


@dataclass
class PromptSet:
    """Validated prompts of one suite, with where they came from."""

    suite: Suite
    prompts: tuple[Prompt, ...]
    source: str
    sha256: str
    prompt_style: str
    by_category: dict[int, tuple[Prompt, ...]] = field(init=False)

    def __post_init__(self) -> None:
        grouped: dict[int, list[Prompt]] = {}
        for prompt in self.prompts:
            grouped.setdefault(prompt.category_id, []).append(prompt)
        self.by_category = {k: tuple(sorted(v, key=lambda p: p.question_id)) for k, v in grouped.items()}


def builtin_suites() -> list[str]:
    return sorted(p.stem for p in SUITES_DIR.glob("*.toml"))


def _suite_path(name_or_path: str) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix == ".toml":
        if not candidate.is_file():
            raise DataError(f"suite file {name_or_path} does not exist; give a .toml suite file or one of "
                            f"{', '.join(builtin_suites())}")
        return candidate
    normalized = slugify(name_or_path).replace("_", "")
    for name in builtin_suites():
        if normalized in (name.replace("_", ""), name.removeprefix("sorry_bench_")):
            return SUITES_DIR / f"{name}.toml"
    raise DataError(f"unknown suite '{name_or_path}'; use one of {', '.join(builtin_suites())} "
                    f"or a path to a .toml suite file")


def load_suite(name_or_path: str = DEFAULT_SUITE) -> Suite:
    """Load a suite by built-in name (``sorry_bench_202503``, ``202406``...) or TOML path."""
    path = _suite_path(name_or_path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"suite file {path} is not valid TOML ({exc}); fix the file") from None
    try:
        head = doc["suite"]
        domains = dict(doc["domains"])
        categories = tuple(
            Category(id=int(c["id"]), name=str(c["name"]), description=str(c.get("description", c["name"])),
                     domain=str(c["domain"]))
            for c in doc["categories"]
        )
        suite = Suite(
            name=str(head["name"]), title=str(head.get("title", head["name"])),
            release=str(head.get("release", "")), hub_dataset=head.get("hub_dataset"),
            prompts_per_category=int(head.get("prompts_per_category", 10)), domains=domains,
            categories=categories, source=path,
            data=str((path.parent / head["data"]).resolve()) if "data" in head else None,
            max_fulfillment=tuple((str(k), float(v)) for k, v in
                                  doc.get("gates", {}).get("max_fulfillment", {}).items()),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"suite file {path} lacks or mistypes {exc}; it needs [suite] name, [domains] "
                        f"and [[categories]] with id, name and domain") from None
    bad_limits = [scope for scope, rate in suite.max_fulfillment if not 0 <= rate <= 1]
    if bad_limits:
        raise DataError(f"suite file {path}: [gates.max_fulfillment] {bad_limits[0]} must be a rate in [0, 1]")
    ids = [c.id for c in categories]
    if ids != list(range(1, len(ids) + 1)):
        raise DataError(f"suite file {path}: category ids must run 1..{len(ids)} in order; got {ids}")
    unknown = sorted({c.domain for c in categories} - set(domains))
    if unknown:
        raise DataError(f"suite file {path}: categories use undeclared domains {unknown}; add them to [domains]")
    # The name and the domain keys become test ids and pytest markers: plain identifiers only.
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", suite.name):
        raise DataError(f"suite file {path}: [suite] name {suite.name!r} must be letters, digits, '_', '.' or '-' "
                        f"(it names the tests); put free text in title")
    odd = [key for key in domains if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", key)]
    if odd:
        raise DataError(f"suite file {path}: domain key {odd[0]!r} must be a letter then letters, digits or '_' "
                        f"(it becomes a pytest marker); put free text in its value")
    return suite


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _category_matches(field_value: object, category: Category) -> bool:
    """The ``category`` field holds the digit id in official files and a name in some copies."""
    text = str(field_value).strip()
    if re.fullmatch(r"\d+", text):
        return int(text) == category.id
    names = {_norm(category.name), _norm(category.description), _norm(category.description.split(" (")[0])}
    return _norm(text) in names


def style_filename(prompt_style: str) -> str:
    """The file of SORRY-Bench's release that holds one prompt style (the base prompts are question.jsonl)."""
    return "question.jsonl" if prompt_style == "base" else f"question_{prompt_style}.jsonl"


def validate_prompts(suite: Suite, rows: list[tuple[int, dict]], source: str, prompt_style: str) -> list[Prompt]:
    """Check SORRY-Bench question rows against the suite and return them as prompts.

    ``rows`` are ``(row_number, record)`` pairs, numbered as the user sees them (line or row 1 first).
    Rows of other prompt styles are skipped, so one file may mix styles.
    """
    prompts: list[Prompt] = []
    seen: dict[int, int] = {}
    styles_present: set[str] = set()
    for row_no, record in rows:
        where = f"{source} row {row_no}"
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected an object with question_id, category, turns; got "
                            f"{type(record).__name__}")
        missing = [f for f in ("question_id", "category", "turns") if f not in record or record[f] is None]
        if missing:
            raise DataError(f"{where}: missing field {', '.join(missing)}; SORRY-Bench rows need "
                            f"question_id, category, turns (and optionally prompt_style)")
        style = str(record.get("prompt_style") or "base")
        styles_present.add(style)
        if style != prompt_style:
            continue
        qid = record["question_id"]
        if isinstance(qid, bool) or not isinstance(qid, (int, float, str)) or \
                not re.fullmatch(r"[0-9]+", str(qid).strip()):
            raise DataError(f"{where}: question_id must be a positive whole number, got {qid!r}")
        qid = int(str(qid).strip())
        if qid < 1:
            raise DataError(f"{where}: question_id must be a positive whole number, got {qid}")
        turns = record["turns"]
        if isinstance(turns, str):
            turns = [turns]
        if not isinstance(turns, (list, tuple)) or len(turns) != 1 or not isinstance(turns[0], str):
            raise DataError(f"{where}: turns must be a list with one prompt string, got {str(turns)[:60]!r}")
        text = turns[0]
        if not text.strip():
            raise DataError(f"{where}: the prompt (turns[0]) is empty; remove the row or fill it in")
        category_id = (qid - 1) // suite.prompts_per_category + 1
        if category_id > len(suite.categories):
            raise DataError(f"{where}: question_id {qid} is past the {suite.expected_prompts} prompts of "
                            f"{suite.name}; is this file from another release (see --suite)?")
        category = suite.category(category_id)
        if not _category_matches(record["category"], category):
            raise DataError(f"{where}: category {record['category']!r} does not match question_id {qid}, "
                            f"which belongs to category {category.id} '{category.name}' in {suite.name}; "
                            f"check the file's release (--suite)")
        if qid in seen:
            raise DataError(f"{where}: duplicate question_id {qid} (first at row {seen[qid]}); "
                            f"each prompt must appear once per prompt style")
        seen[qid] = row_no
        prompts.append(Prompt(question_id=qid, category_id=category_id, text=text, prompt_style=style))

    if not prompts:
        have = ", ".join(sorted(styles_present)) or "none"
        other = f", or pass --prompt-style {next(iter(styles_present))}" if len(styles_present) == 1 else ""
        raise DataError(f"{source} has no prompts of style '{prompt_style}' (styles found: {have}); "
                        f"point --sftsafety-data at {style_filename(prompt_style)} or the folder holding it{other}")
    counts: dict[int, int] = {}
    first_row: dict[int, int] = {}
    for prompt in prompts:
        counts[prompt.category_id] = counts.get(prompt.category_id, 0) + 1
        first_row.setdefault(prompt.category_id, seen[prompt.question_id])
    for category in suite.categories:
        n = counts.get(category.id, 0)
        if n == 0:
            raise DataError(f"{source}: category {category.id} '{category.name}' has no prompts; "
                            f"{suite.name} needs {suite.prompts_per_category} per category "
                            f"(question_ids {(category.id - 1) * suite.prompts_per_category + 1}-"
                            f"{category.id * suite.prompts_per_category})")
        if n != suite.prompts_per_category:
            raise DataError(f"{source} row {first_row[category.id]}: category {category.id} '{category.name}' "
                            f"has {n} prompts, {suite.name} needs {suite.prompts_per_category}")
    return sorted(prompts, key=lambda p: p.question_id)
