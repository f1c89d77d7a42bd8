"""The four RL4VLM card environments ("gym-cards"), rewritten as small gymnasium envs.

    import gymnasium as gym, envs                # importing registers the four ids
    env = gym.make("gym_cards/NumberLine-v0")    # also EZPoints-v0, Points24-v0, Blackjack-v0
    obs, info = env.reset(seed=0)                # obs: (300, 300, 3) uint8 frame
    obs, reward, terminated, truncated, info = env.step(env.unwrapped.oracle())

Rules follow the paper (Zhai et al. 2024, appendix on gym-cards) and its public package, with the
package's defects fixed: formulas are checked in exact rational arithmetic with real operator
validation, a reset never shows the previous episode, and every draw uses the env's seeded
generator. plumbing.py draws the frames (Pillow only) and finds the points games' formulas for
their oracle. `python envs.py` writes a contact sheet of frames to envs_contact_sheet.png.
"""

import ast
import operator
from fractions import Fraction

import gymnasium as gym
import numpy as np

from plumbing import FRAME, PRECEDENCE, card_table, numberline_frame, solutions

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

    def frame(self):  # the card games: a table of cards and text (plumbing.card_table)
        return card_table(*self.table())

    def table(self):  # rows [(y, [(label, suit), ...])], texts [(y, text, size)], card size[, x]
        raise NotImplementedError

    def obs(self):
        return self.render(), self.info()

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


if __name__ == "__main__":  # a contact sheet: three frames per env, with the legal actions
    import plumbing

    plumbing.contact_sheet(TASKS)
