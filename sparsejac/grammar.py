"""numpy's einsum grammar, apart from any computation.

:func:`parse` reads the subscripts string alone; :func:`bind` adds the operands' shapes and
returns an :class:`Einsum`: every axis of every operand and of the output named by an integer
*label*, with one size per label. Everything downstream works on labels, never on strings.

Broadcasting is resolved here once: ``...`` becomes one label per broadcast dimension (aligned
from the right, as numpy does), and a dimension of size 1 whose label has another size elsewhere
gets a fresh label of size 1 of its own (docs/how-it-works.md, section 1), so that later code
never meets a broadcast.

>>> e = bind(parse("ij,jk", 2), [(2, 3), (3, 4)])
>>> e.output_shape
(2, 4)
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Sequence

from .errors import ShapeError, SubscriptError, ArgumentTypeError, context

LETTERS = string.ascii_letters
ELLIPSIS = "..."


@dataclass(frozen=True)
class Subscript:
    """One term of the subscripts: letters before and after its ``...`` (if any)."""

    head: str
    tail: str
    ellipsis: bool

    @property
    def letters(self) -> str:
        return self.head + self.tail

    def __str__(self) -> str:
        return self.head + (ELLIPSIS if self.ellipsis else "") + self.tail


@dataclass(frozen=True)
class Subscripts:
    """The syntax of an einsum: input terms and the output term (explicit or implied)."""

    text: str
    inputs: tuple[Subscript, ...]
    output: Subscript
    explicit: bool


@dataclass(frozen=True)
class Einsum:
    """An einsum bound to shapes: every axis named by an integer label.

    ``inputs[i][d]`` is the label of axis ``d`` of operand ``i``; ``output[d]`` that of the output's
    axis ``d``; ``sizes[label]`` its size; ``names[label]`` how messages spell it.
    """

    subscripts: str
    inputs: tuple[tuple[int, ...], ...]
    output: tuple[int, ...]
    sizes: tuple[int, ...]
    names: tuple[str, ...]

    @property
    def output_shape(self) -> tuple[int, ...]:
        return tuple(self.sizes[label] for label in self.output)

    def shape(self, operand: int) -> tuple[int, ...]:
        return tuple(self.sizes[label] for label in self.inputs[operand])


def _term(text: str, where: str, subscripts: str) -> Subscript:
    dots = text.count(".")
    if dots == 0:
        head, tail, ellipsis = text, "", False
    else:
        first = text.find(ELLIPSIS)
        if first < 0 or dots % 3 or (dots == 3 and text.count(ELLIPSIS) != 1):
            raise SubscriptError(
                f"{context(subscripts)}{where} {text!r} has a broken ellipsis: "
                f"expected exactly three dots '...', got {dots} dot(s)"
            )
        if dots > 3:
            raise SubscriptError(
                f"{context(subscripts)}{where} {text!r} has more than one ellipsis '...'"
            )
        head, tail, ellipsis = text[:first], text[first + 3 :], True
    return Subscript(head, tail, ellipsis)


def require_text(subscripts: object) -> str:
    """``subscripts`` if it is a str; an :class:`ArgumentTypeError` otherwise (checked first by
    every public function, so that later messages can quote it)."""
    if not isinstance(subscripts, str):
        raise ArgumentTypeError(
            f"subscripts must be a str such as 'ij,jk->ik', got {type(subscripts).__name__}"
        )
    return subscripts


def parse(subscripts: object, n_operands: int) -> Subscripts:
    """Parse ``subscripts`` for ``n_operands`` operands (syntax only, no shapes).

    >>> parse("ba,Ab", 2).output   # implicit output: letters used once, in ASCII order
    Subscript(head='Aa', tail='', ellipsis=False)
    """
    text = require_text(subscripts).replace(" ", "")
    for position, char in enumerate(text):
        if char not in LETTERS and char not in ",.->":
            raise SubscriptError(
                f"{context(subscripts)}character {char!r} at position {position} is not allowed: "
                "use letters a-z, A-Z, ',', '...' and '->'"
            )
    arrows = text.count("->")
    if arrows > 1:
        raise SubscriptError(f"{context(subscripts)}more than one '->'")
    left, _, right = text.partition("->")
    if "-" in left or ">" in left or "-" in right or ">" in right:
        raise SubscriptError(f"{context(subscripts)}'-' and '>' may only appear together as '->'")

    pieces = left.split(",")
    if len(pieces) != n_operands:
        raise ShapeError(
            f"{context(subscripts)}the subscripts name {len(pieces)} operand(s), "
            f"but {n_operands} were given"
        )
    inputs = tuple(_term(p, f"input term {i}", subscripts) for i, p in enumerate(pieces))
    counts: dict[str, int] = {}
    for term in inputs:
        for letter in term.letters:
            counts[letter] = counts.get(letter, 0) + 1

    if arrows:
        output = _term(right, "output term", subscripts)
        seen: set[str] = set()
        for letter in output.letters:
            if letter in seen:
                raise SubscriptError(
                    f"{context(subscripts)}output letter {letter!r} appears more than once"
                )
            if letter not in counts:
                raise SubscriptError(
                    f"{context(subscripts)}output letter {letter!r} does not appear in any input"
                )
            seen.add(letter)
        if output.ellipsis and not any(term.ellipsis for term in inputs):
            raise SubscriptError(
                f"{context(subscripts)}the output has '...' but no input has one"
            )
    else:
        once = "".join(sorted(letter for letter, count in counts.items() if count == 1))
        # numpy puts the broadcast dimensions first: "...letters"; without '...' the letters
        # are the head, as an explicit output spells them.
        ellipsis = any(term.ellipsis for term in inputs)
        output = Subscript("", once, True) if ellipsis else Subscript(once, "", False)
    return Subscripts(subscripts, inputs, output, bool(arrows))


def bind(parsed: Subscripts, shapes: Sequence[Sequence[int]]) -> Einsum:
    """Give every axis a label and every label a size, resolving ``...`` and broadcasting.

    Raises :class:`ShapeError` on a rank mismatch, a non-square repeated letter or sizes that do
    not broadcast, naming the letter and the operands.
    """
    sub = parsed.text
    shapes = [tuple(int(n) for n in shape) for shape in shapes]
    if len(shapes) != len(parsed.inputs):
        raise ShapeError(
            f"{context(sub)}the subscripts name {len(parsed.inputs)} operand(s), "
            f"but {len(shapes)} were given"
        )
    n_ellipsis = []
    for i, (term, shape) in enumerate(zip(parsed.inputs, shapes)):
        named = len(term.letters)
        if len(shape) < named or (not term.ellipsis and len(shape) != named):
            want = f"at least {named}" if term.ellipsis else f"{named}"
            raise ShapeError(
                f"{context(sub)}operand {i} has {len(shape)} dimension(s) (shape {shape}), "
                f"but its term {str(term)!r} needs {want}"
            )
        n_ellipsis.append(len(shape) - named)
    n_broadcast = max(n_ellipsis, default=0)
    if parsed.explicit and not parsed.output.ellipsis and n_broadcast:
        raise SubscriptError(
            f"{context(sub)}operands have {n_broadcast} dimension(s) under '...', "
            "but the output has no '...' to put them in"
        )

    names: list[str] = []
    ids: dict[str, int] = {}

    def label(name: str) -> int:
        if name not in ids:
            ids[name] = len(names)
            names.append(name)
        return ids[name]

    broadcast_labels = [label(f"...[{d}]") for d in range(n_broadcast)]
    for letter in sorted(set("".join(t.letters for t in parsed.inputs))):
        label(letter)

    # Axis labels before broadcasting is resolved, and where each size came from.
    raw: list[list[int]] = []
    for term, shape, n_ell in zip(parsed.inputs, shapes, n_ellipsis):
        axes = [ids[c] for c in term.head]
        axes += broadcast_labels[n_broadcast - n_ell :]
        axes += [ids[c] for c in term.tail]
        raw.append(axes)

    size: dict[int, int] = {}
    origin: dict[int, int] = {}
    for i, (axes, shape) in enumerate(zip(raw, shapes)):
        mine: dict[int, int] = {}
        for lab, n in zip(axes, shape):
            if lab in mine and mine[lab] != n:
                raise ShapeError(
                    f"{context(sub)}letter {names[lab]!r} is repeated in operand {i} "
                    f"(shape {shape}) with different sizes {mine[lab]} and {n}: "
                    "a repeated letter takes a diagonal and needs equal sizes"
                )
            mine[lab] = n
        for lab, n in mine.items():
            if n == 1:
                continue
            if lab in size and size[lab] != n:
                raise ShapeError(
                    f"{context(sub)}letter {names[lab]!r} has size {size[lab]} in operand "
                    f"{origin[lab]} but size {n} in operand {i}; sizes must match or be 1"
                )
            size[lab], origin[lab] = n, i

    sizes = [size.get(lab, 1) for lab in range(len(names))]
    # A size-1 axis under a label of another size broadcasts: it gets a label of its own,
    # shared by the repeats of that letter inside the same operand.
    inputs: list[tuple[int, ...]] = []
    for i, (axes, shape) in enumerate(zip(raw, shapes)):
        fresh: dict[int, int] = {}
        bound = []
        for lab, n in zip(axes, shape):
            if n == 1 and sizes[lab] != 1:
                if lab not in fresh:
                    fresh[lab] = len(names)
                    names.append(f"{names[lab]}(broadcast in operand {i})")
                    sizes.append(1)
                lab = fresh[lab]
            bound.append(lab)
        inputs.append(tuple(bound))

    if parsed.output.ellipsis:
        output = [ids[c] for c in parsed.output.head] + broadcast_labels
        output += [ids[c] for c in parsed.output.tail]
    else:
        output = [ids[c] for c in parsed.output.letters]
    return Einsum(sub, tuple(inputs), tuple(output), tuple(sizes), tuple(names))
