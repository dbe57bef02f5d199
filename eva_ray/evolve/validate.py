"""Parsing and validation of evolved prompts.

What an LLM returns for an evolve call is untrusted text: it may wrap the prompt in a code fence or quotes, prefix
it with a label, echo the meta-prompt, ramble far past any sensible length, or hand back its input almost
unchanged. :func:`parse_evolved` removes the harmless wrapping; :class:`EvolveValidator` decides whether what is
left may enter the buffer and counts every rejection by reason, so a run can show *why* its creator is starving.

Duplicates are found against the parent (exact Jaccard of character shingles, one pair: cheap) and against every
prompt registered from the buffer. The buffer may hold up to ~100k prompts, so that check must not compare with
each of them: :class:`NearDuplicateIndex` is a MinHash/LSH index whose lookup touches a handful of candidate
buckets, and only the candidates found there are compared exactly.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

from eva_ray.evolve.operators import INPUT_MARKER, OUTPUT_MARKER, TEMPLATE_MARKERS

# --- rejection reasons ---------------------------------------------------------------------------------------------
EMPTY = "empty"
ONLY_MARKERS = "only_markers"
ECHOED_MARKER = "echoed_marker"
TOO_SHORT = "too_short"
TOO_LONG = "too_long"
NEAR_DUPLICATE_PARENT = "near_duplicate_parent"
DUPLICATE_IN_BUFFER = "duplicate_in_buffer"
NEAR_DUPLICATE_BUFFER = "near_duplicate_buffer"
ECHOED_INSTRUCTION = "echoed_instruction"
REJECTION_REASONS: tuple[str, ...] = (
    EMPTY,
    ONLY_MARKERS,
    ECHOED_MARKER,
    TOO_SHORT,
    TOO_LONG,
    NEAR_DUPLICATE_PARENT,
    DUPLICATE_IN_BUFFER,
    NEAR_DUPLICATE_BUFFER,
    ECHOED_INSTRUCTION,
)

RejectionCounter = Counter  # Counter[str] keyed by one of REJECTION_REASONS


# --- parsing -------------------------------------------------------------------------------------------------------
# Hash-delimited markers, ours and the ones of the original EvolInstruct/eva templates (models trained on those
# templates reproduce them even when our frame did not use them).
_MARKER_WORDS_IN = r"(?:original|given)"
_MARKER_WORDS_OUT = r"(?:new|rewritten|created|evolved)"
_INPUT_RE = re.compile(rf"#\s*{_MARKER_WORDS_IN}\s+prompt\s*#\s*:?", re.IGNORECASE)
_OUTPUT_RE = re.compile(rf"#\s*{_MARKER_WORDS_OUT}\s+prompt\s*#\s*:?", re.IGNORECASE)
_ANY_MARKER_RE = re.compile(
    "|".join([_INPUT_RE.pattern, _OUTPUT_RE.pattern] + [re.escape(m) for m in TEMPLATE_MARKERS]), re.IGNORECASE
)
# Loose labels a chatty model puts in front of its answer ("**New prompt:**", "Here is the rewritten prompt:").
# A separator is required so that a prompt that merely *starts* with "New prompt ..." survives.
_BOLD = r"(?:\*\*|__)?"
# SmolLM2-135M-Instruct also answers "- The new prompt:" and "The new prompt reads:", so a list bullet, a bare "the"
# and a linking verb are allowed around the label.
_LEADING_LABEL_RE = re.compile(
    rf"^\s*(?:[-*\u2022]\s+)?(?:(?:sure|okay|ok|certainly)[,.!]?\s*)?{_BOLD}\s*"
    rf"(?:here(?:'s|\s+is)\s+(?:the|a|my|your)\s+|the\s+)?"
    rf"(?:(?:rewritten|new|created|evolved|revised|improved|generated)\s+)+(?:prompt|task|instruction|question)"
    rf"(?:\s+(?:reads|is|would\s+be))?\s*{_BOLD}\s*[:\-\u2013\u2014]\s*{_BOLD}\s*",
    re.IGNORECASE,
)
# A run of hashes closing the answer is the model imitating the template's markers, not part of the prompt.
_TRAILING_HASHES_RE = re.compile(r"\s*#{2,}\s*$")
_FENCE_RE = re.compile(r"^```[^\n`]*\n(.*?)\n?```$", re.DOTALL)
_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019", "\u00ab": "\u00bb"}

assert _INPUT_RE.fullmatch(INPUT_MARKER) and _OUTPUT_RE.fullmatch(OUTPUT_MARKER), "markers out of sync"


def _unfence(s: str) -> str:
    m = _FENCE_RE.match(s)
    # Only a fence around the *whole* answer is wrapping; a prompt that contains several code blocks is content.
    return m.group(1) if m and "```" not in m.group(1) else s


def _unquote(s: str) -> str:
    if len(s) < 2 or _QUOTES.get(s[0]) != s[-1]:
        return s
    q_open, q_close, inner = s[0], s[-1], s[1:-1]
    if q_open != q_close:
        return inner
    # A symmetric quote: '"a" and "b"' is two quoted phrases, not one wrapped prompt. Strip only when the next
    # quote inside opens a new quotation (follows whitespace) or there is none.
    i = inner.find(q_open)
    if i == -1 or (i > 0 and inner[i - 1].isspace()):
        return inner
    return s


def parse_evolved(raw: str) -> str:
    """The prompt inside an LLM's evolve answer: wrapping, labels and echoed template text removed."""
    s = (raw or "").strip()
    for _ in range(4):  # wrappers can nest (a quoted prompt inside a fence); a few passes reach a fixed point
        before = s
        s = _unfence(s)
        # The model re-typed the template (or reasoned before answering): what follows the last output marker is
        # the answer.
        last = None
        for last in _OUTPUT_RE.finditer(s):
            pass
        if last is not None:
            s = s[last.end():]
        s = _LEADING_LABEL_RE.sub("", s, count=1)
        # The model went on to echo the input section after its answer: keep what precedes it. At position 0 there
        # is no answer before it, so leave it for the echoed-marker check to reject.
        m = _INPUT_RE.search(s)
        if m and m.start() > 0:
            s = s[: m.start()]
        s = _TRAILING_HASHES_RE.sub("", s)
        s = _unquote(s.strip()).strip()
        if s == before:
            break
    return s


# --- similarity ----------------------------------------------------------------------------------------------------
_PUNCT_RE = re.compile(r"[^\w\s]+", re.UNICODE)
_SPACE_RE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Lower-case, punctuation dropped, whitespace collapsed: the form in which two prompts count as the same."""
    return _SPACE_RE.sub(" ", _PUNCT_RE.sub(" ", text.lower())).strip()


_U64 = np.uint64
_M1, _M2, _GOLDEN = _U64(0xBF58476D1CE4E5B9), _U64(0x94D049BB133111EB), _U64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, vectorised: a cheap, well-spread, process-independent 64-bit hash.

    ``x`` must be an array: numpy wraps uint64 array arithmetic silently (the wrap is the point), scalars warn.
    """
    z = x + _GOLDEN
    z = (z ^ (z >> _U64(30))) * _M1
    z = (z ^ (z >> _U64(27))) * _M2
    return z ^ (z >> _U64(31))


def shingles(norm: str, size: int = 5) -> np.ndarray:
    """Sorted unique character ``size``-grams of a normalised text, each packed exactly into an integer.

    Bytes of UTF-8 are packed rather than hashed (``size`` <= 7), so distinct shingles never collide; Python's
    ``hash`` is avoided because it is salted per process.
    """
    if not 1 <= size <= 7:
        raise ValueError(f"shingle size must be in 1..7, got {size}")
    b = np.frombuffer(norm.encode("utf-8"), dtype=np.uint8).astype(_U64)
    if b.size <= size:  # a text shorter than one shingle is its own single shingle
        v = _U64(b.size)
        for i, x in enumerate(b):
            v |= x << _U64(8 * (i + 1))
        return np.array([v], dtype=_U64)
    m = b.size - size + 1
    packed = np.zeros(m, dtype=_U64)
    for k in range(size):
        packed |= b[k : k + m] << _U64(8 * k)
    return np.unique(packed)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity of two sorted unique shingle arrays."""
    inter = np.intersect1d(a, b, assume_unique=True).size
    union = a.size + b.size - inter
    return inter / union if union else 1.0


def echoed_share(text: str, instructions: str, n: int = 4) -> float:
    """Share of ``text``'s word ``n``-grams that also occur in ``instructions`` (0 when it has fewer than n words).

    Word n-grams, not character shingles: two unrelated English texts share many 5-character shingles (" the ",
    "tion ") but almost no runs of four words, while a small model that copies its operator's instruction back
    ("Rework the original prompt so that answering it takes several explicit steps ...") shares nearly all of them.
    """
    def grams(s: str) -> set[tuple[str, ...]]:
        words = normalize(s).split()
        return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}

    mine = grams(text)
    return len(mine & grams(instructions)) / len(mine) if mine else 0.0


class NearDuplicateIndex:
    """Normalised-exact and near-duplicate lookup over a growing, shrinking set of texts.

    Exact duplicates: a dict of normalised texts. Near duplicates: MinHash signatures of character shingles split
    into LSH bands; a query only looks at texts sharing at least one band bucket, then verifies those with exact
    Jaccard. The rows per band are chosen from ``threshold`` so that a pair at the threshold becomes a candidate
    with probability >= 0.99 while unrelated texts almost never do. Registering is idempotent (a set, not a
    multiset), so registering one text twice cannot leave a stale entry behind after a single unregister.
    """

    def __init__(self, threshold: float = 0.95, *, num_perm: int = 64, shingle_size: int = 5, seed: int = 0) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self.shingle_size = shingle_size
        self.num_perm = num_perm
        self.rows = self._pick_rows(threshold, num_perm)
        self.bands = num_perm // self.rows
        seeds = np.arange(2 * num_perm, dtype=_U64) + _U64(2 * seed * num_perm + 1)
        self._perm_a = _mix64(seeds[:num_perm]) | _U64(1)
        self._perm_b = _mix64(seeds[num_perm:])
        self._row_weights = _mix64(np.arange(self.rows, dtype=_U64) + _U64(7919)) | _U64(1)
        self._ids: dict[str, int] = {}
        self._texts: dict[int, str] = {}
        self._buckets: list[dict[int, int | list[int]]] = [{} for _ in range(self.bands)]
        self._next_id = 0
        self.last_candidates = 0
        """How many texts the last :meth:`most_similar` verified exactly (shows the lookup stays sub-linear)."""

    @staticmethod
    def _pick_rows(threshold: float, num_perm: int) -> int:
        best = 1
        for rows in range(1, num_perm + 1):
            if num_perm % rows:
                continue
            if 1.0 - (1.0 - threshold**rows) ** (num_perm // rows) >= 0.99:
                best = rows  # more rows per band = fewer false candidates; keep the most that still has recall
        return best

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, text: str) -> bool:
        return normalize(text) in self._ids

    def _band_keys(self, sh: np.ndarray) -> list[int]:
        # MinHash with num_perm cheap affine hashes (a*x + b mod 2^64, a odd) of the once-mixed shingles: the
        # mixing makes the affine family behave like independent permutations for min-hashing, at a third of the
        # cost of mixing every (permutation, shingle) pair.
        sig = (self._perm_a[:, None] * _mix64(sh)[None, :] + self._perm_b[:, None]).min(axis=1)
        # Fold each band's rows into one key: a weighted sum with distinct odd weights is order-sensitive, so
        # (a, b) and (b, a) land in different buckets; the final mix spreads the sum over all 64 bits.
        folded = (sig.reshape(self.bands, self.rows) * self._row_weights).sum(axis=1, dtype=_U64)
        return _mix64(folded).tolist()

    def register(self, text: str) -> None:
        norm = normalize(text)
        if not norm or norm in self._ids:
            return
        tid = self._next_id
        self._next_id += 1
        self._ids[norm] = tid
        self._texts[tid] = norm
        for bucket, key in zip(self._buckets, self._band_keys(shingles(norm, self.shingle_size))):
            held = bucket.get(key)
            # Most keys hold one text; a bare int instead of a list keeps 100k entries x bands small.
            if held is None:
                bucket[key] = tid
            elif isinstance(held, int):
                bucket[key] = [held, tid]
            else:
                held.append(tid)

    def unregister(self, text: str) -> None:
        norm = normalize(text)
        tid = self._ids.pop(norm, None)
        if tid is None:
            return
        del self._texts[tid]
        for bucket, key in zip(self._buckets, self._band_keys(shingles(norm, self.shingle_size))):
            held = bucket.get(key)
            if held == tid:
                del bucket[key]
            elif isinstance(held, list):
                held.remove(tid)
                if len(held) == 1:
                    bucket[key] = held[0]

    def contains_exact(self, norm: str) -> bool:
        return norm in self._ids

    def most_similar(self, norm: str, sh: np.ndarray | None = None) -> float:
        """The highest exact Jaccard between ``norm`` and any registered candidate (0.0 when none)."""
        sh = shingles(norm, self.shingle_size) if sh is None else sh
        cands: set[int] = set()
        for bucket, key in zip(self._buckets, self._band_keys(sh)):
            held = bucket.get(key)
            if held is None:
                continue
            if isinstance(held, int):
                cands.add(held)
            else:
                cands.update(held)
        self.last_candidates = len(cands)
        best = 0.0
        for tid in cands:
            best = max(best, jaccard(sh, shingles(self._texts[tid], self.shingle_size)))
            if best >= self.threshold:
                break
        return best


@dataclass(eq=False)  # identity semantics: two validators with the same limits still hold different indexes
class EvolveValidator:
    """Decides whether a parsed evolved prompt may enter the buffer; counts every rejection by reason.

    Length: a child may be at most ``max(max_length_ratio * len(parent), len(parent) + min_slack_chars)`` long
    (the slack keeps a 15-character parent from capping its children at 60 characters) and never more than
    ``max_chars``. Similarity: Jaccard of character shingles of the normalised texts, against the parent
    (``parent_similarity``) and against every registered buffer prompt (``buffer_similarity``). Echo: when the
    request's wording is given, a child whose word 4-grams are at least ``instruction_echo`` from it is rejected.
    """

    max_length_ratio: float = 4.0
    min_slack_chars: int = 200
    max_chars: int = 16_000
    min_chars: int = 1
    parent_similarity: float = 0.9
    buffer_similarity: float = 0.95
    instruction_echo: float = 0.5
    shingle_size: int = 5
    num_perm: int = 64

    def __post_init__(self) -> None:
        if self.max_length_ratio <= 0 or self.min_slack_chars < 0 or self.max_chars <= 0 or self.min_chars < 0:
            raise ValueError("length limits must be positive")
        for name in ("parent_similarity", "buffer_similarity", "instruction_echo"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        self.index = NearDuplicateIndex(
            self.buffer_similarity, num_perm=self.num_perm, shingle_size=self.shingle_size
        )
        self.rejections: Counter[str] = Counter()
        self.accepted = 0

    def register(self, text: str) -> None:
        """Add a prompt now in the buffer (or accepted into it) to the duplicate index."""
        self.index.register(text)

    def unregister(self, text: str) -> None:
        """Remove a prompt that left the buffer; unknown texts are ignored."""
        self.index.unregister(text)

    def max_length(self, parent_text: str) -> int:
        n = len(parent_text)
        return min(self.max_chars, int(max(self.max_length_ratio * n, n + self.min_slack_chars)))

    def reason(self, text: str, parent_text: str, instructions: str | None = None) -> str | None:
        """Why an already parsed ``text`` is rejected as a child of ``parent_text``; ``None`` when it is fine.

        ``instructions``: the evolve request's own wording (the meta-prompt without the parent); a child that mostly
        repeats it is the model parroting its task, not a new prompt.
        """
        norm = normalize(text)
        if not norm:
            return EMPTY
        if _ANY_MARKER_RE.search(text):
            return ECHOED_MARKER
        if len(norm) < self.min_chars:
            return TOO_SHORT
        if len(text) > self.max_length(parent_text):
            return TOO_LONG
        if instructions and echoed_share(text, instructions) >= self.instruction_echo:
            return ECHOED_INSTRUCTION
        # Parent before buffer: a child that just restates a parent which is itself in the buffer is the
        # operator's failure, and should be counted as such.
        parent_norm = normalize(parent_text)
        sh = shingles(norm, self.shingle_size)
        if norm == parent_norm or jaccard(sh, shingles(parent_norm, self.shingle_size)) >= self.parent_similarity:
            return NEAR_DUPLICATE_PARENT
        if self.index.contains_exact(norm):
            return DUPLICATE_IN_BUFFER
        if self.index.most_similar(norm, sh) >= self.buffer_similarity:
            return NEAR_DUPLICATE_BUFFER
        return None

    def check(self, text: str, parent_text: str, instructions: str | None = None) -> tuple[str | None, str | None]:
        """Parse a raw answer and validate it: ``(clean_text, None)`` or ``(None, reason)``. Counts the outcome.

        Does not register the accepted text: the caller decides whether it really enters the buffer.
        """
        clean = parse_evolved(text)
        why = self.reason(clean, parent_text, instructions)
        if why == EMPTY and _ANY_MARKER_RE.search(text or ""):
            # The answer was the template's markers and nothing else (parsing strips them): the model echoed the
            # frame, which says something other than an empty answer does.
            why = ONLY_MARKERS
        if why is not None:
            self.rejections[why] += 1
            return None, why
        self.accepted += 1
        return clean, None
