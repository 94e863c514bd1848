"""The shapes world: a compositional prompt grammar, its parser, exact spatial predicates and valid layouts.

Prompts name coloured shapes with counts and 2D relations, in the T2I-CompBench categories shapes can express
(`color`, `shape`, `counting`, `spatial`, `complex`). Everything the judge needs is recoverable from the prompt text
alone (`parse_prompt`), so any prompt file written in this grammar can be scored; text outside it raises
`PromptParseError` naming the offending words.

Layouts live on a 16-step grid of the GoT 0..1000 frame (one step = 62.5 units = 4 px at 64 px, half a VQ patch):
box edges then fall on pixel boundaries at every size we render (64/96/128 px), which is what lets the judge score
a ground-truth image exactly 1.0, and a small LM has only 17 coordinate values to learn.
"""
from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from gotr1.chain import ChainObject, format_chain

# Saturated colours on a white background, named by nearest hue (350, 30, 64, 141, 228, 279 degrees: red, orange
# and yellow as far apart as their names allow), which survives VQ blur: blending with white lowers saturation,
# not hue.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 20, 55), "orange": (255, 128, 0), "yellow": (215, 230, 0),
    "green": (0, 170, 60), "blue": (30, 70, 230), "purple": (150, 40, 210),
}
# Three shapes whose fill ratio / mass distribution tell them apart even at 12 px (a star or a heart would not
# survive an 8x8-patch VQ at 64 px).
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("left of", "right of", "above", "below", "on top of", "next to")
CATEGORIES = ("color", "shape", "counting", "spatial", "complex")

GRID = 16  # layout steps per side of the 0..1000 frame
MAX_COUNT = 5  # largest count a noun phrase may state
# Predicate tolerances in 0..1000 units: TOL absorbs ~2 px of blur at 64 px, TOUCH is the largest gap still
# "on top of" (two grid steps), NEAR the largest gap still "next to" (three grid steps).
TOL, TOUCH, NEAR = 31, 125, 188
GT_MARGIN = 30  # ground-truth layouts satisfy every predicate with this much to spare

Box = tuple[int, int, int, int]
_NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5,
            "1": 1, "2": 2, "3": 3, "4": 4, "5": 5}
_COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}


class PromptParseError(ValueError):
    """The prompt is not in the shapes grammar (the message says which words or structure failed)."""


# ------------------------------------------------------------------------------------------------ specs
@dataclass(frozen=True)
class ObjectSpec:
    colour: str
    shape: str
    count: int = 1

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Relation:
    """`objects[subject]` RELATION `objects[reference]`; for counted groups every pair must hold."""

    subject: int
    relation: str
    reference: int


@dataclass(frozen=True)
class PromptSpec:
    """What a prompt requires: distinct objects (in order of mention) with counts, and the relations it states."""

    objects: tuple[ObjectSpec, ...]
    relations: tuple[Relation, ...] = ()

    @property
    def category(self) -> str:
        """The T2I-CompBench-style category, a pure function of the spec (so any prompt file can be bucketed)."""
        if self.relations:
            simple = len(self.relations) == 1 and len(self.objects) == 2 and self.total == 2
            return "spatial" if simple else "complex"
        if any(o.count > 1 for o in self.objects):
            return "counting"
        return "color" if len({o.shape for o in self.objects}) == 1 else "shape"

    @property
    def total(self) -> int:
        return sum(o.count for o in self.objects)

    def counts(self) -> Counter[str]:
        return Counter({o.name: o.count for o in self.objects})

    def canonical(self) -> PromptSpec:
        """The same requirements with objects sorted by name: equal for every paraphrase of one prompt."""
        order = sorted(range(len(self.objects)), key=lambda i: self.objects[i].name)
        new = {old: n for n, old in enumerate(order)}
        rels = (Relation(new[r.subject], r.relation, new[r.reference]) for r in self.relations)
        return PromptSpec(tuple(self.objects[i] for i in order),
                          tuple(sorted(rels, key=lambda r: (r.subject, r.relation, r.reference))))

    def semantic_key(self) -> tuple:
        """Equal for prompts with the same meaning, converse relations included (A right of B == B left of A)."""
        rels = []
        for r in self.relations:
            a, b = self.objects[r.subject].name, self.objects[r.reference].name
            if r.relation in _CONVERSE:
                a, b = b, a
            rels.append((a, _CONVERSE.get(r.relation, r.relation), b))
        return tuple(sorted((o.name, o.count) for o in self.objects)), tuple(sorted(rels))


_CONVERSE = {"right of": "left of", "below": "above"}


# ------------------------------------------------------------------------------------------- predicates
def _centre(box: Sequence[float]) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def relation_holds(relation: str, a: Sequence[float], b: Sequence[float], margin: float = 0.0) -> bool:
    """Whether box `a` stands in `relation` to box `b` (0..1000 frame, y down), with `margin` units to spare.

    * left of: `a` ends before `b` starts (TOL of overlap allowed) and the centre offset is mostly horizontal
      (dx > |dy|), so "left of" and "above" never both hold; right of is the converse.
    * above: the same vertically; below is the converse.
    * on top of: above, with a vertical gap of at most TOUCH and `a`'s centre over `b`'s horizontal extent.
    * next to: side by side (|dx| > |dy|), a horizontal gap in [-TOL, NEAR], and the boxes share some rows.
    """
    (ax, ay), (bx, by) = _centre(a), _centre(b)
    if relation == "left of":
        return b[0] - a[2] >= margin - TOL and bx - ax > abs(by - ay) + margin
    if relation == "right of":
        return relation_holds("left of", b, a, margin)
    if relation == "above":
        return b[1] - a[3] >= margin - TOL and by - ay > abs(bx - ax) + margin
    if relation == "below":
        return relation_holds("above", b, a, margin)
    if relation == "on top of":
        return (relation_holds("above", a, b, margin) and b[1] - a[3] <= TOUCH - margin
                and b[0] + margin <= ax <= b[2] - margin)
    if relation == "next to":
        gap = max(b[0] - a[2], a[0] - b[2])
        shared_rows = min(a[3], b[3]) - max(a[1], b[1])
        return (abs(bx - ax) > abs(by - ay) + margin and margin - TOL <= gap <= NEAR - margin
                and shared_rows >= max(margin, 1))
    raise ValueError(f"unknown relation {relation!r}; known: {', '.join(RELATIONS)}")


def group_relation_holds(relation: str, subjects: Sequence[Sequence[float]], references: Sequence[Sequence[float]],
                         margin: float = 0.0) -> bool:
    """A stated relation between groups holds when both are present and every (subject, reference) pair holds."""
    return bool(subjects) and bool(references) and all(
        relation_holds(relation, a, b, margin) for a in subjects for b in references)


# ---------------------------------------------------------------------------------------------- lexer
@dataclass(frozen=True)
class _Tok:
    kind: str  # NP, REL, ITS, AND, COMMA, BE, WITH, ALL
    text: str
    rel: str = ""
    count: int = 1
    colour: str | None = None
    shape: str | None = None
    definite: bool = False


_REL_PHRASES = {
    "to the left of": "left of", "on the left of": "left of", "left of": "left of",
    "to the right of": "right of", "on the right of": "right of", "right of": "right of",
    "above": "above", "below": "below", "under": "below", "beneath": "below",
    "on top of": "on top of", "next to": "next to", "beside": "next to",
}
_ITS_PHRASES = {
    "on its left": "left of", "to its left": "left of", "on its right": "right of", "to its right": "right of",
    "above it": "above", "below it": "below", "under it": "below", "beneath it": "below",
    "on top of it": "on top of", "next to it": "next to", "beside it": "next to",
    "on their left": "left of", "to their left": "left of", "on their right": "right of",
    "to their right": "right of", "above them": "above", "below them": "below", "under them": "below",
    "beneath them": "below", "on top of them": "on top of", "next to them": "next to", "beside them": "next to",
}
_CONNECTORS = {"and": "AND", ",": "COMMA", "is": "BE", "are": "BE", "there is": "BE", "there are": "BE",
               "with": "WITH"}
_PREFIXES = ("an image of", "a picture of", "a photo of", "an image with", "a picture with", "a scene with",
             "there is", "there are")
_PHRASES = sorted([(tuple(p.split()), "ITS", r) for p, r in _ITS_PHRASES.items()]
                  + [(tuple(p.split()), "REL", r) for p, r in _REL_PHRASES.items()]
                  + [(tuple(p.split()), k, "") for p, k in _CONNECTORS.items()], key=lambda t: -len(t[0]))
_SHAPE_WORDS = {**{s: s for s in SHAPES}, **{s + "s": s for s in SHAPES}}


def _normalise(prompt: str) -> list[str]:
    text = prompt.strip().lower().rstrip(".!").replace(",", " , ").replace(":", " , ")
    words = text.split()
    for prefix in _PREFIXES:
        p = prefix.split()
        if words[:len(p)] == p and len(words) > len(p):
            return words[len(p):]
    return words


def _lex(prompt: str) -> list[_Tok]:
    words = _normalise(prompt)
    toks: list[_Tok] = []
    i = 0
    while i < len(words):
        w = words[i]
        for phrase, kind, rel in _PHRASES:
            if tuple(words[i:i + len(phrase)]) == phrase:
                toks.append(_Tok(kind, " ".join(phrase), rel=rel))
                i += len(phrase)
                break
        else:
            if w in ("both", "all") and i + 1 < len(words) and words[i + 1] in COLOURS:
                toks.append(_Tok("ALL", f"{w} {words[i + 1]}", colour=words[i + 1]))
                i += 2
                continue
            # noun phrase: [determiner|number] [colour] [shape], at least a colour or a shape
            j, count, definite = i, 1, False
            if words[j] in _NUMBERS or words[j] == "the":
                definite = words[j] == "the"
                count = _NUMBERS.get(words[j], 1)
                j += 1
            colour = words[j] if j < len(words) and words[j] in COLOURS else None
            j += colour is not None
            shape = _SHAPE_WORDS.get(words[j]) if j < len(words) else None
            j += shape is not None
            if colour is None and shape is None:
                bad = words[j] if j < len(words) else words[i]
                raise PromptParseError(f"unknown word {bad!r} in {prompt!r}: the shapes grammar knows colours "
                                       f"({', '.join(COLOURS)}), shapes ({', '.join(SHAPES)}), counts up to "
                                       f"{MAX_COUNT} and the relations {', '.join(RELATIONS)}")
            toks.append(_Tok("NP", " ".join(words[i:j]), count=count, colour=colour, shape=shape, definite=definite))
            i = j
    return toks


# --------------------------------------------------------------------------------------------- parser
@dataclass
class _Entity:
    colour: str | None
    shape: str
    count: int


@dataclass
class _Parser:
    prompt: str
    toks: list[_Tok]
    pos: int = 0
    entities: list[_Entity] = field(default_factory=list)
    relations: list[Relation] = field(default_factory=list)

    def fail(self, why: str) -> PromptParseError:
        near = " ".join(t.text for t in self.toks[self.pos:self.pos + 3]) or "the end"
        return PromptParseError(f"cannot parse {self.prompt!r}: {why} (at {near!r})")

    def peek(self, k: int = 0) -> _Tok | None:
        return self.toks[self.pos + k] if self.pos + k < len(self.toks) else None

    def take(self, kind: str) -> _Tok:
        tok = self.peek()
        if tok is None or tok.kind != kind:
            raise self.fail(f"expected {kind.lower().replace('np', 'an object').replace('rel', 'a relation')}")
        self.pos += 1
        return tok

    def entity(self, tok: _Tok) -> int:
        if tok.shape is None:
            raise self.fail(f"{tok.text!r} names no shape")
        if tok.count > MAX_COUNT:
            raise self.fail(f"counts go up to {MAX_COUNT}")
        if tok.definite:
            for n, e in enumerate(self.entities):
                if (e.colour, e.shape) == (tok.colour, tok.shape):
                    return n
        self.entities.append(_Entity(tok.colour, tok.shape, tok.count))
        return len(self.entities) - 1

    def relate(self, subject: int, relation: str, reference: int) -> None:
        if subject == reference:
            raise self.fail("an object cannot be related to itself")
        self.relations.append(Relation(subject, relation, reference))

    def _next_part(self) -> bool:
        """Skip the separator before another colour-only part of a split ("..., one red, and one blue")."""
        k = 0
        while self.peek(k) is not None and self.peek(k).kind in ("COMMA", "AND") and k < 2:
            k += 1
        tok = self.peek(k)
        if k and tok is not None and tok.kind == "NP" and tok.shape is None:
            self.pos += k
            return True
        return False

    def clause(self) -> None:
        tok = self.peek()
        if tok is not None and tok.kind == "REL":  # "to the left of a blue square is a red circle"
            self.pos += 1
            reference = self.entity(self.take("NP"))
            if self.peek() is not None and self.peek().kind == "COMMA" and self.peek(1) and self.peek(1).kind == "BE":
                self.pos += 1
            self.take("BE")
            self.relate(self.entity(self.take("NP")), tok.rel, reference)
            return
        first = self.take("NP")
        nxt = self.peek()
        if nxt is not None and nxt.kind == "WITH":  # "a blue square with a red circle on its left"
            self.pos += 1
            reference = self.entity(first)
            subject = self.entity(self.take("NP"))
            self.relate(subject, self.take("ITS").rel, reference)
        elif nxt is not None and nxt.kind in ("BE", "REL"):  # "a red circle (is) left of a blue square"
            self.pos += nxt.kind == "BE"
            rel = self.take("REL").rel
            subject = self.entity(first)
            self.relate(subject, rel, self.entity(self.take("NP")))
        elif first.colour is None and nxt is not None and nxt.kind == "COMMA" and self.peek(1) is not None \
                and self.peek(1).kind == "NP" and self.peek(1).shape is None:  # "two squares, one red and one blue"
            self.pos += 1
            parts = [self.take("NP")]
            while self._next_part():
                parts.append(self.take("NP"))
            if sum(p.count for p in parts) != first.count:
                raise self.fail(f"{first.text!r} is split into {sum(p.count for p in parts)} objects")
            for p in parts:
                self.entity(_Tok("NP", p.text, count=p.count, colour=p.colour, shape=first.shape))
        else:
            self.entity(first)

    def parse(self) -> PromptSpec:
        if not self.toks:
            raise PromptParseError(f"empty prompt {self.prompt!r}")
        self.clause()
        shared_colour = None
        while self.pos < len(self.toks):
            tok = self.take(self.peek().kind if self.peek().kind in ("COMMA", "AND", "ALL") else "AND")
            if tok.kind == "COMMA" and self.peek() is not None and self.peek().kind in ("AND", "ALL"):
                tok = self.take(self.peek().kind)
            if tok.kind == "ALL":  # "a circle and a triangle, both green"
                shared_colour = tok.colour
                if self.pos != len(self.toks):
                    raise self.fail(f"{tok.text!r} must end the prompt")
                break
            self.clause()
        for e in self.entities:
            if e.colour is None:
                if shared_colour is None:
                    raise PromptParseError(f"cannot parse {self.prompt!r}: the {e.shape} has no colour")
                e.colour = shared_colour
            elif shared_colour is not None:
                raise PromptParseError(f"cannot parse {self.prompt!r}: 'both/all {shared_colour}' applies only to "
                                       "objects named without a colour")
        names = Counter((e.colour, e.shape) for e in self.entities)
        if (dup := next((n for n, c in names.items() if c > 1), None)) is not None:
            raise PromptParseError(f"cannot parse {self.prompt!r}: the {' '.join(dup)} is introduced twice (refer "
                                   f"back with 'the {' '.join(dup)}', or give one count)")
        objects = tuple(ObjectSpec(e.colour, e.shape, e.count) for e in self.entities)  # type: ignore[arg-type]
        if (clash := _contradiction(objects, self.relations)) is not None:
            raise PromptParseError(f"{self.prompt!r} asks for what no layout can hold: {clash}")
        return PromptSpec(objects, tuple(self.relations))


# Each relation as (axis, sign): the axis its centre offset must be mostly along (`relation_holds`) and the order
# of subject and reference on it (-1: the subject first; 0: either).
_DIRECTIONS = {"left of": ("x", -1), "right of": ("x", 1), "above": ("y", -1), "on top of": ("y", -1),
               "below": ("y", 1), "next to": ("x", 0)}


def _contradiction(objects: Sequence[ObjectSpec], relations: Sequence[Relation]) -> str | None:
    """Why no layout satisfies `relations` together, or None: two relations of one pair along different axes or
    in opposite orders ("left of" and "above", "left of" and "right of"), or a cycle of strict orders along one
    axis (A left of B, B left of C, C left of A)."""
    def said(r: Relation) -> str:
        return f"the {objects[r.subject].name} {r.relation} the {objects[r.reference].name}"

    pairs: dict[tuple[int, int], tuple[Relation, str, int]] = {}
    before: dict[str, dict[int, list[tuple[int, Relation]]]] = {"x": {}, "y": {}}
    for r in relations:
        axis, sign = _DIRECTIONS[r.relation]
        key, oriented = (r.subject, r.reference), sign
        if key[0] > key[1]:
            key, oriented = key[::-1], -sign
        if (seen := pairs.get(key)) is not None:
            if seen[1] != axis or seen[2] * oriented < 0:
                return f"{said(seen[0])} and {said(r)}"
            oriented = oriented or seen[2]
        pairs[key] = (r, axis, oriented)
        if sign:
            first, second = (r.subject, r.reference) if sign < 0 else (r.reference, r.subject)
            before[axis].setdefault(first, []).append((second, r))
    for edges in before.values():
        if (cycle := _cycle(edges)) is not None:
            return " and ".join(said(r) for r in cycle)
    return None


def _cycle(edges: dict[int, list[tuple[int, Relation]]]) -> list[Relation] | None:
    """The relations along one cycle of the directed graph `edges` (node -> (next node, relation)), or None."""
    state: dict[int, int] = {}  # 1: on the current path, 2: done

    def walk(nodes: list[int], path: list[Relation]) -> list[Relation] | None:
        """Depth first from `nodes[-1]`; `path[i]` is the relation from `nodes[i]` to `nodes[i + 1]`."""
        state[nodes[-1]] = 1
        for nxt, r in edges.get(nodes[-1], ()):
            if state.get(nxt) == 1:
                return [*path[nodes.index(nxt):], r]
            if nxt not in state and (found := walk([*nodes, nxt], [*path, r])) is not None:
                return found
        state[nodes[-1]] = 2
        return None

    for start in list(edges):
        if start not in state and (cycle := walk([start], [])) is not None:
            return cycle
    return None


@lru_cache(maxsize=65536)
def parse_prompt(prompt: str) -> PromptSpec:
    """The objects, counts and relations a prompt in the shapes grammar requires; `PromptParseError` otherwise."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptParseError("empty prompt")
    return _Parser(prompt, _lex(prompt)).parse()


def parse_prompts(prompts: Sequence[str]) -> list[PromptSpec]:
    """Every prompt's spec; one `PromptParseError` listing every prompt outside the grammar (1-based positions),
    so a prompt file is checked before any generation starts."""
    specs, errors = [], []
    for n, prompt in enumerate(prompts, 1):
        try:
            specs.append(parse_prompt(prompt))
        except PromptParseError as e:
            errors.append(f"prompt {n}: {e}")
    if errors:
        raise PromptParseError(f"{len(errors)} of {len(prompts)} prompts are not in the shapes grammar:\n"
                               + "\n".join(errors[:20]) + ("\n..." if len(errors) > 20 else ""))
    return specs


# ------------------------------------------------------------------------------------------- describe
def _np(obj: ObjectSpec, rng: random.Random, definite: bool = False) -> str:
    if definite:
        return f"the {obj.colour} {obj.shape}" + ("s" if obj.count > 1 else "")
    if obj.count > 1:
        count = str(obj.count) if rng.random() < 0.2 else _COUNT_WORDS[obj.count]
        return f"{count} {obj.colour} {obj.shape}s"
    det = rng.choice(("a", "a", "a", "one"))
    if det == "a" and obj.colour[0] in "aeiou":
        det = "an"
    return f"{det} {obj.colour} {obj.shape}"


def _join(items: Sequence[str], rng: random.Random) -> str:
    if len(items) == 1:
        return items[0]
    comma = "," if len(items) > 2 and rng.random() < 0.5 else ""
    return ", ".join(items[:-1]) + f"{comma} and {items[-1]}"


_REL_SURFACE = {r: [p for p, rr in _REL_PHRASES.items() if rr == r] for r in RELATIONS}
_INVERTIBLE = {r: [p for p in ps if not p.startswith(("left", "right"))] for r, ps in _REL_SURFACE.items()}
_ITS_SURFACE = {(r, plural): [p for p, rr in _ITS_PHRASES.items()
                              if rr == r and (" their" in p or " them" in p) == plural]
                for r in RELATIONS for plural in (False, True)}
LIST_FORMS = ("plain", "prefix", "shared")  # shared: "two squares, one red and one blue" / "..., both green"
RELATION_FORMS = ("plain", "is", "inverted", "with")


def describe_list(objects: Sequence[ObjectSpec], rng: random.Random, form: str = "plain") -> str:
    """A relation-free prompt for `objects` in one of `LIST_FORMS` ('shared' needs one shared shape or colour)."""
    if form == "shared":
        if len(objects) > 1 and all(o.count == 1 for o in objects) and len({o.shape for o in objects}) == 1:
            parts = [f"one {o.colour}" for o in objects]
            return f"{_COUNT_WORDS[len(objects)]} {objects[0].shape}s, {_join(parts, rng)}"
        if len(objects) > 1 and len({o.colour for o in objects}) == 1:
            items = [f"{_COUNT_WORDS[o.count]} {o.shape}s" if o.count > 1 else f"a {o.shape}" for o in objects]
            word = "both" if len(objects) == 2 else "all"
            return f"{_join(items, rng)}, {word} {objects[0].colour}"
        raise ValueError("the 'shared' form needs objects sharing a shape (one each) or a colour")
    text = _join([_np(o, rng) for o in objects], rng)
    if form == "prefix":
        return f"{rng.choice(_PREFIXES[:6])} {text}"
    if form != "plain":
        raise ValueError(f"unknown list form {form!r}")
    return text


def describe_relation(subject: ObjectSpec, relation: str, reference: ObjectSpec, rng: random.Random,
                      form: str = "plain", definite_reference: bool = False) -> str:
    """One relation clause in one of `RELATION_FORMS`."""
    a, b = _np(subject, rng), _np(reference, rng, definite_reference)
    be = "are" if subject.count > 1 else "is"
    if form == "plain":
        return f"{a} {rng.choice(_REL_SURFACE[relation])} {b}"
    if form == "is":
        return f"{a} {be} {rng.choice(_REL_SURFACE[relation])} {b}"
    if form == "inverted":
        return f"{rng.choice(_INVERTIBLE[relation])} {b} {be} {a}"
    if form == "with":
        return f"{b} with {a} {rng.choice(_ITS_SURFACE[relation, reference.count > 1])}"
    raise ValueError(f"unknown relation form {form!r}")


# ---------------------------------------------------------------------------------------- sample specs
def _random_objects(rng: random.Random, n: int, *, same_shape: bool = False, distinct_shapes: bool = False,
                    same_colour: bool = False) -> list[ObjectSpec]:
    """`n` objects with distinct names under the given constraint."""
    if same_shape:
        shape = rng.choice(SHAPES)
        return [ObjectSpec(c, shape) for c in rng.sample(list(COLOURS), n)]
    # one colour for all: only distinct shapes give distinct names (else the loop below never ends)
    shapes = rng.sample(SHAPES, n) if distinct_shapes or same_colour else [rng.choice(SHAPES) for _ in range(n)]
    colour = rng.choice(list(COLOURS))
    out: list[ObjectSpec] = []
    for s in shapes:
        while True:
            o = ObjectSpec(colour if same_colour else rng.choice(list(COLOURS)), s)
            if o.name not in {p.name for p in out}:
                break
        out.append(o)
    return out


def sample_prompt(rng: random.Random, category: str) -> tuple[str, PromptSpec]:
    """A random prompt of `category` and the spec it was written from (parsing the text gives it back)."""
    if category == "color":  # colour binding: one shape, distinct colours
        objects = _random_objects(rng, rng.choice((2, 2, 3)), same_shape=True)
        return describe_list(objects, rng, rng.choice(LIST_FORMS)), PromptSpec(tuple(objects))
    if category == "shape":  # shape binding: distinct shapes
        shared = rng.random() < 0.25
        objects = _random_objects(rng, rng.choice((2, 2, 3)), distinct_shapes=True, same_colour=shared)
        form = "shared" if shared and rng.random() < 0.5 else rng.choice(LIST_FORMS[:2])
        return describe_list(objects, rng, form), PromptSpec(tuple(objects))
    if category == "counting":
        n = rng.choice((1, 2, 2))
        objects = _random_objects(rng, n)
        counts = [rng.randint(2, 4)] + [rng.randint(1, 2) for _ in range(n - 1)]
        rng.shuffle(counts)
        objects = [ObjectSpec(o.colour, o.shape, c) for o, c in zip(objects, counts)]
        return describe_list(objects, rng, rng.choice(LIST_FORMS[:2])), PromptSpec(tuple(objects))
    if category == "spatial":
        a, b = _random_objects(rng, 2)
        rel = rng.choice(RELATIONS)
        form = rng.choice(RELATION_FORMS)
        text = describe_relation(a, rel, b, rng, form)
        if form in ("plain", "is") and rng.random() < 0.2:
            text = f"{rng.choice(_PREFIXES[:3])} {text}"
        return text, PromptSpec((a, b), (Relation(0, rel, 1),))
    if category == "complex":
        if rng.random() < 0.5:  # counted groups in one relation: "two green triangles above a yellow circle"
            a, b = _random_objects(rng, 2)
            ca = rng.randint(2, 3)
            cb = rng.choice((1, 1, 2)) if ca == 2 else 1
            a, b = ObjectSpec(a.colour, a.shape, ca), ObjectSpec(b.colour, b.shape, cb)
            rel = rng.choice(("left of", "right of", "above", "below", "above", "below", "on top of", "next to"))
            if rel in ("on top of", "next to"):
                a, b = ObjectSpec(a.colour, a.shape, 2), ObjectSpec(b.colour, b.shape, 1)
            text = describe_relation(a, rel, b, rng, rng.choice(RELATION_FORMS))
            return text, PromptSpec((a, b), (Relation(0, rel, 1),))
        # three objects, two relations sharing one: "a red square left of a blue circle and a green triangle
        # below the blue circle"
        a, b, c = _random_objects(rng, 3)
        r1, r2 = rng.choice(RELATIONS), rng.choice(RELATIONS)
        first = describe_relation(a, r1, b, rng, rng.choice(("plain", "is")))
        anchor, anchor_idx = (b, 1) if rng.random() < 0.6 else (a, 0)
        second = describe_relation(c, r2, anchor, rng, rng.choice(("plain", "is")), definite_reference=True)
        text = f"{first}{rng.choice((' and', ', and', ','))} {second}"
        return text, PromptSpec((a, b, c), (Relation(0, r1, 1), Relation(2, r2, anchor_idx)))
    raise ValueError(f"unknown category {category!r}; choose one of {', '.join(CATEGORIES)}")


# -------------------------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    box: Box
    entity: int  # index into the spec's objects

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


def grid_to_frame(g: int) -> int:
    """Grid step -> 0..1000 coordinate (62.5 units a step, rounded half up)."""
    return int(g * 1000 / GRID + 0.5)


def _frame(grid_box: tuple[int, int, int, int]) -> Box:
    return tuple(grid_to_frame(v) for v in grid_box)  # type: ignore[return-value]


def _separated(a: Box, b: Box) -> bool:
    """At least one grid step of background between the boxes (so same-colour objects never touch)."""
    step = 1000 / GRID - 1
    return a[2] + step <= b[0] or b[2] + step <= a[0] or a[3] + step <= b[1] or b[3] + step <= a[1]


def layout_valid(spec: PromptSpec, objects: Sequence[SceneObject], margin: float = GT_MARGIN) -> bool:
    """Counts match the spec, every pair is separated, every stated relation holds with `margin`."""
    if Counter(o.name for o in objects) != spec.counts():
        return False
    if any(not _separated(a.box, b.box) for i, a in enumerate(objects) for b in objects[i + 1:]):
        return False
    for r in spec.relations:
        subjects = [o.box for o in objects if o.entity == r.subject]
        references = [o.box for o in objects if o.entity == r.reference]
        if not group_relation_holds(r.relation, subjects, references, margin):
            return False
    return True


def _propose(rng: random.Random, relation: str, size: int, ref: tuple[int, int, int, int]) -> tuple[int, int]:
    """Grid top-left corner for a `size` box standing in `relation` to the reference group's grid extent `ref`
    (centred on it along the other axis; the caller shifts it there)."""
    x1, y1, x2, y2 = ref
    if relation in ("left of", "right of", "next to"):
        side = relation if relation != "next to" else rng.choice(("left of", "right of"))
        gap = rng.randint(1, 2) if relation == "next to" else rng.randint(1, 4)
        return (x1 - gap - size if side == "left of" else x2 + gap), (y1 + y2 - size) // 2
    if relation in ("above", "below", "on top of"):
        gap = 1 if relation == "on top of" else rng.randint(1, 4)
        return (x1 + x2 - size) // 2, (y1 - gap - size if relation != "below" else y2 + gap)
    raise ValueError(f"unknown relation {relation!r}")


def sample_layout(spec: PromptSpec, rng: random.Random, tries: int = 200) -> tuple[SceneObject, ...]:
    """Boxes for every object of `spec` that satisfy its relations with `GT_MARGIN` and never touch.

    Rejection sampling with relation-aware proposals: the objects in relations are laid out relative to one
    another (references first, each subject instance in the region its relation implies), the cluster is shifted
    to a random place on the canvas, free objects are dropped one by one into empty space, and the result is
    checked with the same predicates the judge uses. Instances of one object are listed left to right, then top
    to bottom.
    """
    subjects = {r.subject for r in spec.relations}
    related = subjects | {r.reference for r in spec.relations}
    pending = [i for i in range(len(spec.objects)) if i in related and i not in subjects] + sorted(subjects)
    order: list[int] = []  # each subject after all of its references, where no cycle ("next to" both ways) forbids it
    while pending:
        ent = next((e for e in pending if all(r.reference in order for r in spec.relations if r.subject == e)),
                   pending[0])
        order.append(ent)
        pending.remove(ent)
    free = [i for i in range(len(spec.objects)) if i not in related]
    sizes = (3, 4) if spec.total > 3 else (3, 4, 5)
    for _ in range(tries):
        grid: dict[int, list[tuple[int, int, int, int]]] = {}
        for ent in order:
            rel = next((r for r in spec.relations if r.subject == ent and r.reference in grid), None)
            ss = [rng.choice(sizes) for _ in range(spec.objects[ent].count)]
            if rel is None:
                grid[ent] = [(x, y, x + s, y + s) for s in ss
                             for x, y in [(rng.randint(0, GRID - s), rng.randint(0, GRID - s))]]
                continue
            refs = grid[rel.reference]
            extent = (min(b[0] for b in refs), min(b[1] for b in refs), max(b[2] for b in refs),
                      max(b[3] for b in refs))
            # a group's instances form a row (or column) centred on the reference, along the free axis
            vertical = rel.relation in ("above", "below", "on top of")
            gaps = [1 + rng.randint(0, 1) for _ in ss[1:]]
            centre = (extent[0] + extent[2]) // 2 if vertical else (extent[1] + extent[3]) // 2
            along = centre - (sum(ss) + sum(gaps)) // 2 + (rng.randint(-3, 3) if len(ss) == 1 else 0)
            boxes = []
            for k, s in enumerate(ss):
                x, y = _propose(rng, rel.relation, s, extent)
                x, y = (along, y) if vertical else (x, along)
                boxes.append((x, y, x + s, y + s))
                along += s + (gaps[k] if k < len(gaps) else 0)
            grid[ent] = boxes
        placed = [b for bs in grid.values() for b in bs]
        if placed:  # relations are translation-invariant: move the cluster anywhere it fits
            x0, y0 = min(b[0] for b in placed), min(b[1] for b in placed)
            x1, y1 = max(b[2] for b in placed), max(b[3] for b in placed)
            if x1 - x0 > GRID or y1 - y0 > GRID:
                continue
            dx, dy = rng.randint(-x0, GRID - x1), rng.randint(-y0, GRID - y1)
            grid = {e: [(b[0] + dx, b[1] + dy, b[2] + dx, b[3] + dy) for b in bs] for e, bs in grid.items()}
            placed = [b for bs in grid.values() for b in bs]
        for ent in free:
            grid[ent] = []
            for _k in range(spec.objects[ent].count):
                for _t in range(50):
                    s = rng.choice(sizes)
                    x, y = rng.randint(0, GRID - s), rng.randint(0, GRID - s)
                    box = _frame((x, y, x + s, y + s))
                    if all(_separated(box, _frame(b)) for b in placed):
                        break
                else:
                    break
                grid[ent].append((x, y, x + s, y + s))
                placed.append((x, y, x + s, y + s))
        objects = tuple(SceneObject(spec.objects[e].colour, spec.objects[e].shape, _frame(b), e)
                        for e in range(len(spec.objects)) for b in sorted(grid[e]))
        if layout_valid(spec, objects):
            return objects
    raise RuntimeError(f"no valid layout found in {tries} tries for {spec}")


# ---------------------------------------------------------------------------------------------- scenes
@dataclass(frozen=True)
class Scene:
    """A prompt, what it requires (parsed from the text) and one valid ground-truth layout of it."""

    prompt: str
    spec: PromptSpec
    objects: tuple[SceneObject, ...]

    @property
    def category(self) -> str:
        return self.spec.category

    @property
    def relations(self) -> tuple[Relation, ...]:
        return self.spec.relations

    def chain_objects(self) -> list[ChainObject]:
        return [ChainObject(o.name, o.box) for o in self.objects]


def scene_for_prompt(prompt: str, rng: random.Random) -> Scene:
    """A ground-truth layout for any prompt in the grammar (raises `PromptParseError` / `RuntimeError`)."""
    spec = parse_prompt(prompt)
    return Scene(prompt, spec, sample_layout(spec, rng))


def sample_scene(rng: random.Random, category: str) -> Scene:
    """A random prompt of `category` with a valid layout; the scene's spec is parsed back from its text."""
    for _ in range(50):
        text, spec = sample_prompt(rng, category)
        parsed = parse_prompt(text)
        if parsed.canonical() != spec.canonical() or parsed.category != category:
            raise AssertionError(f"grammar bug: {text!r} parses to {parsed}, written from {spec}")
        try:
            return Scene(text, parsed, sample_layout(parsed, rng))
        except RuntimeError:
            continue  # rare crowded specs: draw another prompt
    raise RuntimeError(f"could not sample a {category} scene")


def gt_chain(scene: Scene) -> str:
    """The ground-truth GoT chain: objects in mention order with their boxes, in one short sentence."""
    objects = scene.chain_objects()
    prose = ["The image shows"] + ["and"] * (len(objects) - 1)
    clauses = []
    for r in scene.spec.relations:
        a, b = scene.spec.objects[r.subject], scene.spec.objects[r.reference]
        verb = "are" if a.count > 1 else "is"
        clauses.append(f"the {a.name}{'s' if a.count > 1 else ''} {verb} {r.relation} the {b.name}"
                       f"{'s' if b.count > 1 else ''}")
    prose.append(f"so {' and '.join(clauses)}." if clauses else "on a white background.")
    return format_chain(objects, prose)


# ---------------------------------------------------------------------------------------------- splits
def split_scenes(seed: int = 0, n_train: int = 2000, n_val: int = 200) -> tuple[list[Scene], list[Scene]]:
    """Train / validation scenes fixed by `seed`, balanced across categories, with disjoint meanings.

    No validation prompt means the same as any training prompt (not even as a paraphrase or with the converse
    relation), so validation measures generalisation to unseen combinations, not memorised layouts.
    """
    if n_train % len(CATEGORIES) or n_val % len(CATEGORIES):
        raise ValueError(f"n_train and n_val must be multiples of {len(CATEGORIES)} (one share per category)")
    train: list[Scene] = []
    val: list[Scene] = []
    for c, category in enumerate(CATEGORIES):
        rng = random.Random(f"shapes-split-{seed}-{c}")
        val_keys: set[tuple] = set()
        prompts: set[str] = set()
        cat_val: list[Scene] = []
        cat_train: list[Scene] = []
        draws = 0
        while len(cat_val) < n_val // len(CATEGORIES) or len(cat_train) < n_train // len(CATEGORIES):
            draws += 1
            if draws > 200 * (n_train + n_val):
                raise RuntimeError(f"the {category} category has too few distinct prompts for this split")
            scene = sample_scene(rng, category)
            if scene.prompt in prompts:
                continue
            key = scene.spec.semantic_key()
            if len(cat_val) < n_val // len(CATEGORIES) and key not in val_keys:
                val_keys.add(key)
                cat_val.append(scene)
            elif key not in val_keys and len(cat_train) < n_train // len(CATEGORIES):
                cat_train.append(scene)
            else:
                continue
            prompts.add(scene.prompt)
        train += cat_train
        val += cat_val
    return train, val


def splits(seed: int = 0, n_train: int = 2000, n_val: int = 200) -> tuple[list[str], list[str]]:
    """The prompts of `split_scenes`: (train_prompts, val_prompts)."""
    train, val = split_scenes(seed, n_train, n_val)
    return [s.prompt for s in train], [s.prompt for s in val]
