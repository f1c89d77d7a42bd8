"""Tests for rl4vlm-min: the envs' rules, then the RL4VLM loop's invariants, then the real CLI.

Run: HF_HUB_OFFLINE=1 python -m pytest -q test_min.py
"""
import itertools
from fractions import Fraction

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs import EZPoints, NumberLine, Points24, Blackjack, evaluate

IDS = ["gym_cards/NumberLine-v0", "gym_cards/EZPoints-v0", "gym_cards/Points24-v0", "gym_cards/Blackjack-v0"]


# ---- ENVS: API ----
@pytest.mark.parametrize("env_id", IDS)
def test_env_api(env_id):
    env = gym.make(env_id, render_mode="rgb_array")
    check_env(env.unwrapped, skip_render_check=False)
    obs, info = env.reset(seed=3)
    assert obs.shape == (300, 300, 3) and obs.dtype == np.uint8
    assert np.array_equal(env.render(), obs)
    names = env.unwrapped.action_names
    assert env.action_space.n == len(names)
    for bad in (-1, len(names), 0.5, "+"):
        with pytest.raises(ValueError, match="not in 0.."):
            env.unwrapped.step(bad)


@pytest.mark.parametrize("env_id", IDS)
def test_vector_env_and_seeding(env_id):
    venv = gym.make_vec(env_id, num_envs=3, vectorization_mode="sync")
    obs, _ = venv.reset(seed=5)
    assert obs.shape == (3, 300, 300, 3)
    obs, rewards, term, trunc, _ = venv.step(np.zeros(3, dtype=int))
    assert rewards.shape == (3,)
    # the same seed gives the same deal and byte-identical frames, also after other episodes
    env = gym.make(env_id).unwrapped
    a, info_a = env.reset(seed=42)
    for _ in range(5):
        env.reset()
    b, info_b = env.reset(seed=42)
    assert info_a == info_b and a.tobytes() == b.tobytes()


def test_action_names():
    assert NumberLine.action_names == ["-", "+"]
    assert EZPoints.action_names == [str(i) for i in range(1, 11)] + ["+", "*", "="]
    assert Points24.action_names == [str(i) for i in range(1, 11)] + ["+", "-", "*", "/", "(", ")", "="]
    assert Blackjack.action_names == ["stand", "hit"]


# ---- ENVS: NumberLine rules ----
def numberline(target, current):
    env = NumberLine()
    env.reset(seed=0)
    env.target, env.current = target, current
    return env


def test_numberline_rewards():
    env = numberline(3, 1)
    assert env.step(1)[1:4] == (0.0, False, False)      # closer: 0
    assert env.step(0)[1:4] == (-1.0, False, False)     # away: -1
    assert env.step(1)[1:4] == (0.0, False, False)
    assert env.step(1)[1:4] == (1.0, True, False)       # reached: +1, terminated
    env = numberline(3, 0)
    assert env.step(0)[1] == -1.0 and env.current == 0  # bumping the wall: -1, stays
    env = numberline(5, 0)
    for i in range(10):                                  # truncated after 10 moves, not terminated
        _, r, term, trunc, info = env.step(0)
    assert (term, trunc) == (False, True) and info == {"Target": 5, "Current": 0}


def test_numberline_frames_differ_by_state():
    assert not np.array_equal(numberline(3, 1).render(), numberline(3, 2).render())


# ---- ENVS: EZPoints / Points24 rules ----
def points(cls, ranks):
    env = cls()
    env.reset(seed=0)
    env.cards = [(r, "S") for r in ranks]
    return env


def play(env, tokens):
    rewards = []
    for tok in tokens:
        _, r, term, trunc, info = env.step(env.action_names.index(tok))
        rewards.append(r)
    return rewards, term, trunc, info


def test_ezpoints_rules():
    assert play(points(EZPoints, [2, 13]), ["2", "+", "10", "="])[:2] == ([0, 0, 0, 10], True)  # K counts 10
    assert play(points(EZPoints, [3, 4]), ["3", "*", "4", "="])[0][-1] == 10
    assert play(points(EZPoints, [3, 4]), ["3", "+", "4", "="])[0][-1] == -1      # 7, not 12
    assert play(points(EZPoints, [6, 6]), ["6", "="])[0][-1] == -1                # one card unused
    rewards, _, _, info = play(points(EZPoints, [2, 10]), ["5", "2", "2"])
    assert rewards == [-1, 0, -1] and info["Formula"] == ["2"]                    # not on a card / used up
    assert play(points(EZPoints, [2, 10]), ["2", "+", "+", "10", "="])[0][-1] == -1  # no unary "+"
    assert play(points(EZPoints, [2, 10]), ["="])[0] == [-1]                      # empty formula: -1, no raise
    rewards, term, trunc, _ = play(points(EZPoints, [2, 10]), ["+"] * 6)
    assert rewards[-1] == -1 and (term, trunc) == (False, True)                   # longer than 5 tokens


def test_points24_exact_arithmetic():
    assert play(points(Points24, [8, 3, 8, 3]), "8 / ( 3 - 8 / 3 ) =".split())[0][-1] == 10
    assert play(points(Points24, [1, 1, 1, 1]), "1 + 1 ) =".split())[0][-1] == -1
    assert evaluate("8 / ( 3 - 8 / 3 )".split()) == 24
    for bad in ["2 + + 10", "( 2", "2 )", "", "1 / ( 1 - 1 )", "- 2", "2 3"]:
        assert evaluate(bad.split()) is None, bad


def test_reset_shows_no_previous_formula():
    env = EZPoints()
    env.reset(seed=1)
    env.step(env.oracle())
    assert env.formula
    _, info = env.reset()
    assert info["Formula"] == [] and env.slots == 0


# ---- ENVS: Blackjack rules ----
def test_blackjack_rules():
    env = Blackjack()
    env.reset(seed=0)
    env.player, env.dealer = [(10, "S"), (9, "H")], [(10, "D"), (8, "C")]
    info = env.info()
    assert info["Dealer Card"] == ["10D"] and "8C" not in str(info)             # hidden card never shown
    assert env.step(0)[1:3] == (1.0, True)                                        # 19 beats 18
    env.reset(seed=0)
    env.player, env.dealer = [(10, "S"), (7, "H")], [(10, "D"), (8, "C")]
    assert env.step(0)[1] == -1.0
    env.reset(seed=0)
    env.player, env.dealer = [(1, "S"), (7, "H")], [(10, "D"), (8, "C")]          # soft 18 vs 18: draw
    assert env.step(0)[1] == 0.0
    env.reset(seed=0)
    env.player = [(10, "S"), (9, "H"), (5, "H")]
    assert envs.hand_total(env.player) == (24, False)
    env.player = [(1, "S"), (1, "H"), (9, "H")]
    assert envs.hand_total(env.player) == (21, True)


def test_blackjack_oracle_basic_strategy():
    env = Blackjack()
    env.reset(seed=0)
    cases = [([10, 7], 10, 0), ([10, 6], 6, 0), ([10, 6], 7, 1), ([10, 2], 4, 0), ([10, 2], 3, 1),
             ([1, 7], 8, 0), ([1, 7], 9, 1), ([1, 8], 10, 0), ([5, 6], 10, 1)]
    for ranks, up, action in cases:
        env.player, env.dealer = [(r, "S") for r in ranks], [(up, "H"), (5, "D")]
        assert env.oracle() == action, (ranks, up)


# ---- ENVS: oracles and baselines ----
def solvable(values, target):
    """An independent solver: combine any two numbers with + - * / until one is left."""
    if len(values) == 1:
        return values[0] == target
    for i, j in itertools.permutations(range(len(values)), 2):
        rest = [v for k, v in enumerate(values) if k not in (i, j)]
        a, b = values[i], values[j]
        outs = [a + b, a - b, a * b] + ([a / b] if b else [])
        if any(solvable(rest + [c], target) for c in outs):
            return True
    return False


def run_episode(env, seed, policy):
    _, info = env.reset(seed=seed)
    total = 0.0
    while True:
        _, r, term, trunc, info = env.step(policy(env))
        total += r
        if term or trunc:
            return total


def test_oracle_solves_every_ezpoints_deal():
    env = EZPoints()
    for ranks in EZPoints.DEALS:
        env.reset(seed=0)
        env.cards = [(r, "H") for r in ranks]
        env.formula, env.slots = [], 0
        total = 0
        while True:
            _, r, term, trunc, _ = env.step(env.oracle())
            total += r
            if term or trunc:
                break
        assert total == 10, ranks


def test_oracle_solves_every_solvable_points24_deal():
    env = Points24()
    solved = 0
    for seed in range(150):
        env.reset(seed=seed)
        can = solvable([Fraction(v) for v in env.numbers()], 24)
        total = run_episode_from_state(env)
        assert (total == 10) == can, env.info()
        solved += can
    assert 0.6 < solved / 150 < 0.9           # about 73% of deals are solvable (the paper's figure)


def run_episode_from_state(env):
    total = 0.0
    while True:
        _, r, term, trunc, _ = env.step(env.oracle())
        total += r
        if term or trunc:
            return total


@pytest.mark.parametrize("cls,oracle_min,random_max", [(NumberLine, 1.0, 0.4), (EZPoints, 1.0, 0.05),
                                                       (Points24, 0.6, 0.05), (Blackjack, 0.36, 0.33)])
def test_oracle_and_random_success(cls, oracle_min, random_max):
    env, rng = cls(), np.random.default_rng(0)
    oracle = np.mean([run_episode(env, s, lambda e: e.oracle()) > 0 for s in range(300)])
    rand = np.mean([run_episode(env, s, lambda e: int(rng.integers(e.action_space.n))) > 0 for s in range(300)])
    assert oracle >= oracle_min and rand <= random_max and oracle > rand, (oracle, rand)
