"""The four RL4VLM card environments ("gym-cards"), rewritten as small gymnasium envs.

    import gymnasium as gym, envs                # importing registers the four ids
    env = gym.make("gym_cards/NumberLine-v0")    # also EZPoints-v0, Points24-v0, Blackjack-v0
    obs, info = env.reset(seed=0)                # obs: (300, 300, 3) uint8 frame
    obs, reward, terminated, truncated, info = env.step(env.unwrapped.oracle())

Rules follow the paper (Zhai et al. 2024, appendix on gym-cards) and its public package, with the
package's defects fixed: formulas are checked in exact rational arithmetic with real operator
validation, a reset never shows the previous episode, and every draw uses the env's seeded
generator. Each env draws its own frames (Pillow only, its bundled font: no font file) and its
oracle finds the points games' formulas by search. This module imports nothing of the project.
`python envs.py` writes a contact sheet of frames to envs_contact_sheet.png.
"""

import ast
import functools
import itertools
import operator
from fractions import Fraction

import gymnasium as gym
import numpy as np
from PIL import Image, ImageDraw, ImageFont

RANKS = {1: "A", 11: "J", 12: "Q", 13: "K"}  # other ranks print as their number
SUITS = "SHDC"  # spades, hearts, diamonds, clubs


def card_name(rank, suit):  # e.g. (12, "H") -> "QH"
    return f"{RANKS.get(rank, str(rank))}{suit}"


def card_value(rank):  # faces count as 10, an ace as 1
    return min(rank, 10)


def label_value(label):  # what a card's label counts: "Q" -> 10, "A" -> 1, "7" -> 7
    return {"A": 1, "J": 10, "Q": 10, "K": 10}.get(label) or int(label)


def labels(cards):  # what each card shows: its rank, or "" face down (rank 0)
    return [(RANKS.get(rank, str(rank)) if rank else "", suit) for rank, suit in cards]


# ---- DRAWING THE CARDS: each card drawn once (cached); frames paste cached cards ----
FRAME = 300  # frames are FRAME x FRAME x 3 uint8, as in the original package
TABLE = (0x35, 0x65, 0x4D)  # the card games' dark green table


@functools.cache
def font(size):  # Pillow's bundled scalable font: no font file needed
    return ImageFont.load_default(size=size)


def draw_suit(d, suit, cx, cy, r, color):
    """A suit symbol centred at (cx, cy) with half-size r, from circles and polygons."""

    def circle(x, y, radius):  # (x, y) and radius in units of r
        box = [cx + (x - radius) * r, cy + (y - radius) * r, cx + (x + radius) * r]
        d.ellipse(box + [cy + (y + radius) * r], fill=color)

    if suit == "D":
        d.polygon(
            [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)], fill=color
        )
        return
    if suit == "C":
        for x, y in ((0, -0.45), (-0.5, 0.15), (0.5, 0.15)):
            circle(x, y, 0.45)
    else:  # a heart, or a spade (an upside-down heart)
        s = 1 if suit == "H" else -1
        circle(-0.45, -s * 0.3, 0.5)
        circle(0.45, -s * 0.3, 0.5)
        top = cy - s * 0.15 * r
        d.polygon([(cx - 0.95 * r, top), (cx + 0.95 * r, top), (cx, cy + s * r)], fill=color)
    if suit in "SC":  # the stem of a spade or a club
        d.polygon([(cx, cy), (cx - 0.35 * r, cy + r), (cx + 0.35 * r, cy + r)], fill=color)


@functools.cache
def card_image(label, suit, w=64, h=92):
    """One card: a big rank in the middle (legible when the frame is shrunk), suits in two
    corners. label "" = face down (the dealer's hidden card)."""
    img = Image.new("RGB", (w, h), TABLE)
    d = ImageDraw.Draw(img)
    d.rounded_rectangle([0, 0, w - 1, h - 1], radius=6, fill="white", outline="black", width=2)
    if not label:
        d.rounded_rectangle([5, 5, w - 6, h - 6], radius=4, fill=(150, 30, 40))
        return img
    color = (200, 0, 0) if suit in "HD" else (0, 0, 0)
    d.text((w / 2, h / 2 - 4), label, font=font(round(0.37 * h)), fill=color, anchor="mm")
    draw_suit(d, suit, 11, 12, 6, color)
    draw_suit(d, suit, w - 12, h - 13, 6, color)
    return img


def card_places(rows, size=(64, 92), left=None):
    """Where card_table puts each card of rows [(y, [(label, suit), ...]), ...]: (x, y, label,
    suit) of its top-left corner; each row centred, or from x = left (cards overlap if many)."""
    w = size[0]
    for y, cards in rows:
        step = min(w + 8, (FRAME - 20 - w) / max(len(cards) - 1, 1))
        x0 = (FRAME - w - step * (len(cards) - 1)) / 2 if left is None else left
        for i, (label, suit) in enumerate(cards):
            yield round(x0 + i * step), y, label, suit


def card_table(rows, texts=(), size=(64, 92), left=None):
    """A green table with rows of cards of `size` (card_places) and lines of white text
    [(y, text, font size), ...]."""
    img = Image.new("RGB", (FRAME, FRAME), TABLE)
    for x, y, label, suit in card_places(rows, size, left):
        img.paste(card_image(label, suit, *size), (x, y))
    for y, text, font_size in texts:
        d = ImageDraw.Draw(img)
        d.text((FRAME / 2, y), text, font=font(font_size), fill="white", anchor="mm")
    return img


@functools.cache
def numberline_frame(target, current):  # only 30 possible frames: draw each once
    img = Image.new("RGB", (FRAME, FRAME), "white")
    d = ImageDraw.Draw(img)
    d.text((FRAME / 2, 90), f"Target: {target}", font=font(48), fill="black", anchor="mm")
    d.text((FRAME / 2, 210), f"Current: {current}", font=font(48), fill="black", anchor="mm")
    return img


class CardEnv(gym.Env):
    """What the four games share: seeded reset, action checking, frames. Subclasses set
    action_names and the rules."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}
    action_names = []

    def __init__(self, render_mode=None):
        assert render_mode in (None, "rgb_array"), (
            f"render_mode must be None or 'rgb_array', got {render_mode!r}"
        )
        self.render_mode = render_mode
        self.action_space = gym.spaces.Discrete(len(self.action_names))
        self.observation_space = gym.spaces.Box(0, 255, (FRAME, FRAME, 3), np.uint8)

    def check_action(self, action):
        if not self.action_space.contains(action):
            raise ValueError(
                f"{type(self).__name__}: action {action!r} is not in 0..{self.action_space.n - 1} "
                f"({self.action_names}); pass an integer index into env.action_names"
            )
        return self.action_names[int(action)]

    def render(self):
        return np.array(self.frame())  # (300, 300, 3) uint8, the observation itself

    def frame(self):  # the card games: a table of cards and text (card_table)
        return card_table(*self.table())

    def table(self):  # rows [(y, [(label, suit), ...])], texts [(y, text, size)], card size[, x]
        raise NotImplementedError

    def obs(self):
        return self.render(), self.info()

    def sensible_actions(self):
        """The actions a random SFT answer picks from (rl4vlm_min.sft_answers): every action here;
        EZPoints overrides it, as its formula has one shape."""
        return list(range(len(self.action_names)))

    state_fields = ()  # the game's own fields: with the generator, its whole state (--resume)


# ---- NUMBERLINE: move "Current" to "Target" on 0..5 ----
class NumberLine(CardEnv):
    action_names = ["-", "+"]
    state_fields = ("target", "current", "steps")
    max_steps = 10  # truncated after 10 moves

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        target, current = self.np_random.choice(6, size=2, replace=False)  # two different
        self.target, self.current = int(target), int(current)
        self.steps = 0
        return self.obs()

    def step(self, action):
        move = self.check_action(action)
        before = abs(self.current - self.target)
        self.current = min(max(self.current + (1 if move == "+" else -1), 0), 5)
        self.steps += 1
        terminated = self.current == self.target
        reward = 1.0 if terminated else (0.0 if abs(self.current - self.target) < before else -1.0)
        truncated = self.steps >= self.max_steps and not terminated
        return self.render(), reward, terminated, truncated, self.info()

    def info(self):
        return {"Target": self.target, "Current": self.current}

    def oracle(self):
        return int(self.target > self.current)

    def frame(self):
        return numberline_frame(self.target, self.current)


# ---- EZPOINTS / POINTS24: write a formula with the cards' numbers that makes the target ----
def evaluate(tokens):
    """Exact value of a formula (a list of tokens), or None if malformed. Python's parser reads
    it; only numbers and binary + - * / are allowed (so "- 2" and "2 + + 10" are malformed),
    each computed as a Fraction: 8 / (3 - 8 / 3) is exactly 24."""
    try:
        return exact(ast.parse(" ".join(tokens), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError):
        return None


OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}


def exact(node):
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in OPS:
        return OPS[type(node.op)](exact(node.left), exact(node.right))
    raise ValueError("a formula holds numbers and binary + - * / only")


# ---- THE POINTS GAMES' ORACLE: every formula that makes the target, for PointsEnv.plan ----
PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


@functools.cache
def solutions(values, target, ops):
    """Every formula (token tuple, fewest brackets) using each of `values` once that equals
    `target`, shortest first."""

    def build(items):  # items: tuple of (tokens, value, precedence); yields full expressions
        if len(items) == 1:
            yield items[0]
            return
        for i, j in itertools.permutations(range(len(items)), 2):
            (a, va, pa), (b, vb, pb) = items[i], items[j]
            rest = tuple(x for k, x in enumerate(items) if k not in (i, j))
            for op in ops:
                if op == "/" and vb == 0:
                    continue
                p = PRECEDENCE[op]
                left = ("(", *a, ")") if pa < p else a
                right = ("(", *b, ")") if pb < p or (pb == p and op in "-/") else b
                value = {"+": va + vb, "-": va - vb, "*": va * vb, "/": va / vb if vb else 0}[op]
                yield from build(rest + ((left + (op,) + right, value, p),))

    found = {
        tokens
        for tokens, value, _ in build(tuple(((str(v),), Fraction(v), 3) for v in values))
        if value == target
    }
    return sorted(found, key=lambda t: (len(t), t))


class PointsEnv(CardEnv):
    """Cards are dealt face up; each action appends a number or an operator to the formula;
    "=" checks it."""

    target, num_cards, max_formula = 24, 4, 20
    state_fields = ("cards", "formula", "slots")

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.cards = self.deal()
        self.formula = []  # the tokens written so far (a new list: nothing from the last episode)
        self.slots = 0  # formula slots used; an illegal number also uses one, as in the original
        return self.obs()

    def deal(self):  # Points24: four ranks 1..13 drawn independently
        return [
            (int(r), SUITS[int(s)])
            for r, s in zip(self.np_random.integers(1, 14, 4), self.np_random.integers(0, 4, 4))
        ]

    def numbers(self):
        return [card_value(r) for r, _ in self.cards]

    def unused_numbers(self):
        left = self.numbers()
        for tok in self.formula:
            if tok.isdigit():
                left.remove(int(tok))
        return left

    def step(self, action):
        tok = self.check_action(action)
        if tok == "=":
            used = sorted(int(t) for t in self.formula if t.isdigit()) == sorted(self.numbers())
            ok = used and evaluate(self.formula) == self.target
            return self.render(), 10.0 if ok else -1.0, True, False, self.info()
        self.slots += 1
        reward = 0.0
        if tok.isdigit() and int(tok) not in self.unused_numbers():
            reward = -1.0  # a number that is not on an unused card: penalised, formula unchanged
        else:
            self.formula.append(tok)
        if self.slots > self.max_formula:
            return self.render(), -1.0, False, True, self.info()  # formula too long: truncated
        return self.render(), reward, False, False, self.info()

    def info(self):
        return {
            "Cards": [card_name(*c) for c in self.cards],
            "Numbers": self.numbers(),
            "Formula": list(self.formula),
        }

    @classmethod
    def plan(cls, numbers, formula):
        """The shortest correct formula that extends `formula` (a token tuple), or None."""
        ops = tuple(a for a in cls.action_names if a in PRECEDENCE)
        for sol in solutions(tuple(sorted(numbers)), cls.target, ops):
            if list(sol[: len(formula)]) == list(formula):
                return sol
        return None

    def oracle(self):
        """Next token of the shortest correct formula extending the current one; "=" if none."""
        sol, n = self.plan(self.numbers(), self.formula), len(self.formula)
        return self.action_names.index(sol[n] if sol and n < len(sol) else "=")

    def table(self):
        text = " ".join(self.formula) if self.formula else "(empty)"
        texts = [(205, "Formula:", 26), (250, text, 30 if len(text) < 16 else 18)]
        size = (100, 150) if self.num_cards == 2 else (64, 92)
        return [(20, labels(self.cards))], texts, size


class Points24(PointsEnv):
    action_names = [str(i) for i in range(1, 11)] + ["+", "-", "*", "/", "(", ")", "="]


class EZPoints(PointsEnv):
    action_names = [str(i) for i in range(1, 11)] + ["+", "*", "="]
    target, num_cards, max_formula = 12, 2, 5
    # Every ordered pair of ranks 2..13 (no aces) whose values make 12 with + or *: all solvable.
    DEALS = [
        (a, b)
        for a in range(2, 14)
        for b in range(2, 14)
        if card_value(a) + card_value(b) == 12 or card_value(a) * card_value(b) == 12
    ]

    def deal(self):
        ranks = self.DEALS[self.np_random.integers(len(self.DEALS))]
        return [(r, SUITS[int(s)]) for r, s in zip(ranks, self.np_random.integers(0, 4, 2))]

    def sensible_actions(self):
        """Moves that keep the shape "number operator number =": a number on an unused card when
        one is due, then + or *, then "=". Which operator makes 12 is left to the policy. A formula
        off that shape (random moves can write "3 4 +") has none: then any action."""
        formula, left = self.formula, self.unused_numbers()
        if not formula or formula[-1] in PRECEDENCE:  # a number is due
            moves = [str(n) for n in sorted(set(left))]
        else:
            moves = ["+", "*"] if left else ["="]
        return [self.action_names.index(m) for m in moves] or super().sensible_actions()


# ---- BLACKJACK: gymnasium's Blackjack-v1 rules as cards; the dealer's second card face down ----
def hand_total(cards):
    """(best total, usable ace): an ace counts 11 when that does not bust the hand."""
    total = sum(card_value(r) for r, _ in cards)
    soft = any(r == 1 for r, _ in cards) and total + 10 <= 21
    return total + 10 * soft, soft


class Blackjack(CardEnv):
    action_names = ["stand", "hit"]
    state_fields = ("player", "dealer", "done")

    def draw(self):  # infinite deck: every rank equally likely
        return int(self.np_random.integers(1, 14)), SUITS[int(self.np_random.integers(4))]

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.player = [self.draw(), self.draw()]
        self.dealer = [self.draw(), self.draw()]
        self.done = False
        return self.obs()

    def step(self, action):
        if self.check_action(action) == "hit":
            self.player.append(self.draw())
            self.done = hand_total(self.player)[0] > 21
            return self.render(), -1.0 if self.done else 0.0, self.done, False, self.info()
        while hand_total(self.dealer)[0] < 17:  # stand: the dealer draws to 17 or more
            self.dealer.append(self.draw())
        me, dealer = hand_total(self.player)[0], hand_total(self.dealer)[0]
        self.done = True
        reward = 1.0 if dealer > 21 or me > dealer else (-1.0 if me < dealer else 0.0)
        return self.render(), reward, True, False, self.info()

    def info(self):  # the hidden card never appears here (nor in the prompt)
        return {
            "Player Card": [card_name(*c) for c in self.player],
            "Player Total": hand_total(self.player)[0],
            "Dealer Card": [card_name(*self.dealer[0])],
            "Dealer Total": hand_total(self.dealer[:1])[0],
        }

    def oracle(self):
        """Basic strategy for stand/hit only (no double or split): stand on hard 17+, on hard
        13-16 against a dealer 2-6, on hard 12 against 4-6, on soft 19+, and on soft 18 against
        2-8; otherwise hit."""
        total, soft = hand_total(self.player)
        up = card_value(self.dealer[0][0])  # the dealer's visible card, ace = 1
        if soft:
            stand = total >= 19 or (total == 18 and 2 <= up <= 8)
        else:
            stand = (
                total >= 17
                or (13 <= total <= 16 and 2 <= up <= 6)
                or (total == 12 and 4 <= up <= 6)
            )
        return int(not stand)

    def table(self):
        dealer = self.dealer if self.done else [self.dealer[0], (0, "")]  # rank 0: face down
        rows = [(30, labels(dealer)), (178, labels(self.player))]
        texts = [(140, "Dealer above, player below", 16)]
        return rows, texts, (64, 92), 20  # cards from x = 20: each keeps its place as hands grow


TASKS = {cls.__name__.lower(): cls for cls in (NumberLine, EZPoints, Points24, Blackjack)}
for _cls in TASKS.values():
    gym.register(f"gym_cards/{_cls.__name__}-v0", entry_point=_cls)


def contact_sheet(tasks, path="envs_contact_sheet.png"):
    """Three frames of each env along the oracle's moves, with the legal actions."""
    sheet = Image.new("RGB", (3 * FRAME, 4 * (FRAME + 40)), "white")
    for row, cls in enumerate(tasks.values()):
        env = cls()
        obs, _ = env.reset(seed=row)
        for col in range(3):
            sheet.paste(Image.fromarray(obs), (col * FRAME, row * (FRAME + 40) + 40))
            obs, _, term, trunc, _ = env.step(env.oracle())
            if term or trunc:
                obs, _ = env.reset()
        title = f"{cls.__name__}: actions {' '.join(cls.action_names)}"
        ImageDraw.Draw(sheet).text((8, row * (FRAME + 40) + 8), title, font=font(20), fill="black")
    sheet.save(path)
    print(f"wrote {path}")


if __name__ == "__main__":  # a contact sheet: three frames per env, with the legal actions
    contact_sheet(TASKS)
