"""The best success any stand/hit policy can reach in envs.Blackjack, computed exactly.

The deck is infinite (every rank 1/13, as envs.Blackjack draws), so the chance of winning from any
hand is a small recursion over (total, has an ace, dealer's visible card). Prints, for the hard
hands of 12-16 against a dealer 7-A, the chance of a win (success: the episode's reward > 0) and
the expected reward if the player stands or hits (then plays on as well as it can); then the
success of the policy that maximizes wins, of the one that maximizes the expected reward, and of
basic strategy as envs.Blackjack.oracle plays it, each over the whole deal.
Run: python results/blackjack_best.py
"""

import itertools
import os
import sys
from functools import lru_cache

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import envs  # noqa: E402

RANKS = range(1, 14)  # ace .. king, each drawn with chance 1/13


def best(total, ace):  # total counts an ace as 1; it counts 11 where that does not bust
    return total + 10 if ace and total + 10 <= 21 else total


@lru_cache(None)
def dealer_final(total, ace):
    """{final total (22 = bust): probability}; the dealer draws to 17 or more, as the env does."""
    if best(total, ace) >= 17:
        return {min(best(total, ace), 22): 1.0}
    out = {}
    for rank in RANKS:
        value = envs.card_value(rank)
        for final, p in dealer_final(total + value, ace or value == 1).items():
            out[final] = out.get(final, 0.0) + p / 13
    return out


def stand(player, up, goal):
    """Win chance ("win") or expected reward ("reward") of standing on `player` against `up`."""
    final = dealer_final(up, up == 1)  # the hidden card is one more draw
    win = sum(p for f, p in final.items() if f == 22 or f < player)
    lose = sum(p for f, p in final.items() if f <= 21 and f > player)
    return win if goal == "win" else win - lose


@lru_cache(None)
def play(total, ace, up, goal, policy=None):
    """The hand's value under the best play for `goal`, or under policy(total, ace, up) -> hit."""
    if best(total, ace) > 21:
        return 0.0 if goal == "win" else -1.0
    hit = sum(play(total + envs.card_value(r), ace or r == 1, up, goal, policy) for r in RANKS) / 13
    stay = stand(best(total, ace), up, goal)
    if policy is not None:
        return hit if policy(total, ace, up) else stay
    return max(hit, stay)


def hits(goal):
    return lambda total, ace, up: play(total, ace, up, goal) > stand(best(total, ace), up, goal)


def basic_strategy(total, ace, up):
    """envs.Blackjack.oracle on a hand with this total (an ace if `ace`, then tens, a remainder)."""
    env = envs.Blackjack()
    cards = [1] if ace else []
    rest = total - len(cards)
    while rest > 0:  # no card of 1 left over: that would be an ace
        cards.append(min(rest, 10) - (rest == 11))
        rest -= cards[-1]
    env.player, env.dealer = [(c, "S") for c in cards], [(up, "S"), (0, "")]
    return env.oracle() == 1


def success(policy):
    """The policy's win chance over the whole deal: two cards each, the dealer's first visible."""
    total = 0.0
    for a, b, up in itertools.product(RANKS, RANKS, RANKS):
        va, vb, vu = (envs.card_value(r) for r in (a, b, up))
        total += play(va + vb, va == 1 or vb == 1, vu, "win", policy) / 13**3
    return total


def hit(total, up, goal):  # hit a hard total once, then play on as well as possible
    return sum(play(total + envs.card_value(r), r == 1, up, goal) for r in RANKS) / 13


def main():
    for goal, what in (("win", "win chance"), ("reward", "expected reward")):
        print(f"hard total vs dealer 7, 8, 9, 10, A: {what} standing / hitting (then best play)")
        for total in range(12, 17):
            cells = [
                f"{stand(total, u, goal):.3f} / {hit(total, u, goal):.3f}" for u in (7, 8, 9, 10, 1)
            ]
            print(f"  {total}: " + " | ".join(cells))
    print(f"success of the policy that maximizes wins:            {success(hits('win')):.4f}")
    print(f"success of the policy that maximizes expected reward: {success(hits('reward')):.4f}")
    print(f"success of basic strategy (envs.Blackjack.oracle):    {success(basic_strategy):.4f}")


if __name__ == "__main__":
    main()
