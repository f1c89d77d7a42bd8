"""Tests for rl4vlm-min: the envs' rules, then the RL4VLM loop's invariants, then the real CLI.

Run: HF_HUB_OFFLINE=1 python -m pytest -q -n 2 test_min.py (two processes; without -n 2, one)
"""

import itertools
import os
from fractions import Fraction

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs import Blackjack, EZPoints, NumberLine, Points24, evaluate

IDS = [
    "gym_cards/NumberLine-v0",
    "gym_cards/EZPoints-v0",
    "gym_cards/Points24-v0",
    "gym_cards/Blackjack-v0",
]


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
    assert Points24.action_names == [str(i) for i in range(1, 11)] + [
        "+",
        "-",
        "*",
        "/",
        "(",
        ")",
        "=",
    ]
    assert Blackjack.action_names == ["stand", "hit"]


# ---- ENVS: NumberLine rules ----
def numberline(target, current):
    env = NumberLine()
    env.reset(seed=0)
    env.target, env.current = target, current
    return env


def test_numberline_rewards():
    env = numberline(3, 1)
    assert env.step(1)[1:4] == (0.0, False, False)  # closer: 0
    assert env.step(0)[1:4] == (-1.0, False, False)  # away: -1
    assert env.step(1)[1:4] == (0.0, False, False)
    assert env.step(1)[1:4] == (1.0, True, False)  # reached: +1, terminated
    env = numberline(3, 0)
    assert env.step(0)[1] == -1.0 and env.current == 0  # bumping the wall: -1, stays
    env = numberline(5, 0)
    for _ in range(10):  # truncated after 10 moves, not terminated
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
    assert play(points(EZPoints, [2, 13]), ["2", "+", "10", "="])[:2] == (
        [0, 0, 0, 10],
        True,
    )  # K counts 10
    assert play(points(EZPoints, [3, 4]), ["3", "*", "4", "="])[0][-1] == 10
    assert play(points(EZPoints, [3, 4]), ["3", "+", "4", "="])[0][-1] == -1  # 7, not 12
    assert play(points(EZPoints, [6, 6]), ["6", "="])[0][-1] == -1  # one card unused
    rewards, _, _, info = play(points(EZPoints, [2, 10]), ["5", "2", "2"])
    assert rewards == [-1, 0, -1] and info["Formula"] == ["2"]  # not on a card / used up
    assert play(points(EZPoints, [2, 10]), ["2", "+", "+", "10", "="])[0][-1] == -1  # no unary "+"
    assert play(points(EZPoints, [2, 10]), ["="])[0] == [-1]  # empty formula: -1, no raise
    rewards, term, trunc, _ = play(points(EZPoints, [2, 10]), ["+"] * 6)
    assert rewards[-1] == -1 and (term, trunc) == (False, True)  # longer than 5 tokens


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
    assert info["Dealer Card"] == ["10D"] and "8C" not in str(info)  # hidden card never shown
    assert env.step(0)[1:3] == (1.0, True)  # 19 beats 18
    env.reset(seed=0)
    env.player, env.dealer = [(10, "S"), (7, "H")], [(10, "D"), (8, "C")]
    assert env.step(0)[1] == -1.0
    env.reset(seed=0)
    env.player, env.dealer = [(1, "S"), (7, "H")], [(10, "D"), (8, "C")]  # soft 18 vs 18: draw
    assert env.step(0)[1] == 0.0
    env.reset(seed=0)
    env.player = [(10, "S"), (9, "H"), (5, "H")]
    assert envs.hand_total(env.player) == (24, False)
    env.player = [(1, "S"), (1, "H"), (9, "H")]
    assert envs.hand_total(env.player) == (21, True)


def test_blackjack_oracle_basic_strategy():
    env = Blackjack()
    env.reset(seed=0)
    cases = [
        ([10, 7], 10, 0),
        ([10, 6], 6, 0),
        ([10, 6], 7, 1),
        ([10, 2], 4, 0),
        ([10, 2], 3, 1),
        ([1, 7], 8, 0),
        ([1, 7], 9, 1),
        ([1, 8], 10, 0),
        ([5, 6], 10, 1),
    ]
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
    assert 0.6 < solved / 150 < 0.9  # about 73% of deals are solvable (the paper's figure)


def run_episode_from_state(env):
    total = 0.0
    while True:
        _, r, term, trunc, _ = env.step(env.oracle())
        total += r
        if term or trunc:
            return total


@pytest.mark.parametrize(
    "cls,oracle_min,random_max",
    [(NumberLine, 1.0, 0.4), (EZPoints, 1.0, 0.05), (Points24, 0.6, 0.05), (Blackjack, 0.36, 0.33)],
)
def test_oracle_and_random_success(cls, oracle_min, random_max):
    env, rng = cls(), np.random.default_rng(0)
    oracle = np.mean([run_episode(env, s, lambda e: e.oracle()) > 0 for s in range(300)])
    rand = np.mean(
        [run_episode(env, s, lambda e: int(rng.integers(e.action_space.n))) > 0 for s in range(300)]
    )
    assert oracle >= oracle_min and rand <= random_max and oracle > rand, (oracle, rand)


# ---- THE LOOP: parser, GAE, scoring, LoRA, PPO invariants ----
import json
import subprocess
import sys
from types import SimpleNamespace

import torch
import transformers

if os.environ.get("PYTEST_XDIST_WORKER"):  # the README's `pytest -n 2`: two worker processes,
    os.environ["OMP_NUM_THREADS"] = "1"  # one torch thread each (and in the subprocesses they
    torch.set_num_threads(1)  # start), so the two share 2 cores without oversubscribing them

import build_tiny_llava as B
import checkpoints
import checks
import parallel
import report
import rl4vlm_min as R
from fixtures import tiny_families

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize(
    "text,names,expected",
    [
        ('{"thoughts": "current is 1, target is 3", "action": "+"}', NumberLine.action_names, 1),
        ('{"thoughts": "x", "action": "-"}', NumberLine.action_names, 0),
        ('{"THOUGHTS": "x", "ACTION": "HIT"}', Blackjack.action_names, 1),  # case does not matter
        ('{"action": "10"}', EZPoints.action_names, 9),  # "10" is not "1"
        ('{"action": "1"}', EZPoints.action_names, 0),
        ('{"action": "*"}', EZPoints.action_names, 11),
        (
            '"action": "+" then later "action": "stand"',
            Blackjack.action_names,
            0,
        ),  # the last key counts
        (
            '{"thoughts": "hit or stand?", "action": "stand"}',
            Blackjack.action_names,
            0,
        ),  # thoughts are ignored
    ],
)
def test_parser_table(text, names, expected):
    assert R.parse_action(text, names, np.random.default_rng(0)) == (expected, True)


@pytest.mark.parametrize(
    "text,names",
    [
        ('{"thoughts": "move +"}', NumberLine.action_names),  # no action key
        ('{"action": "+ or -"}', NumberLine.action_names),  # two actions
        ('{"action": "11"}', EZPoints.action_names),  # no legal action
        ("", Blackjack.action_names),
        ("\x00\ud800 junk", Points24.action_names),
    ],
)
def test_parser_fallback_is_random_and_counted(text, names):
    picks = {R.parse_action(text, names, np.random.default_rng(s)) for s in range(300)}
    assert all(ok is False for _, ok in picks) and {i for i, _ in picks} == set(range(len(names)))


def test_parser_never_raises_on_random_strings():
    rng = np.random.default_rng(0)
    alphabet = list('"action:{}, +-*/()=0123456789 standhit\n\\') + [
        "\u00e9",
        "\u2603",
        '"action":',
    ]
    for _ in range(10_000):
        text = "".join(rng.choice(alphabet, size=int(rng.integers(0, 40))))
        for names in (NumberLine.action_names, Points24.action_names):
            index, ok = R.parse_action(text, names, rng)
            assert 0 <= index < len(names) and isinstance(ok, bool)


def test_gae_hand_worked():
    # one env, 3 steps, the episode ends after step 1 (index 1); gamma 0.5, lambda 0.5
    rewards = torch.tensor([[1.0], [2.0], [3.0]])
    values = torch.tensor([[0.5], [1.0], [2.0]])
    dones = torch.tensor([[0.0], [1.0], [0.0]])
    adv, ret = R.compute_gae(rewards, values, dones, torch.tensor([4.0]), gamma=0.5, gae_lambda=0.5)
    d2 = 3 + 0.5 * 4 - 2  # 3.0, bootstrapped from next_value
    d1 = 2 - 1  # 1.0, no bootstrap across the episode end
    d0 = 1 + 0.5 * 1.0 - 0.5  # 1.0
    a1 = d1  # the trace is cut at the done
    a0 = d0 + 0.25 * a1  # 1.25
    assert torch.allclose(adv[:, 0], torch.tensor([a0, a1, d2]))
    assert torch.allclose(ret, adv + values)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = B.build_tiny_model(str(tmp_path_factory.mktemp("tiny")), seed=0)
    processor, vlm = R.load_model(path, torch.device("cpu"), torch.float32)
    return path, processor, vlm


def fresh_policy(tiny, thought_coef=0.5, temperature=1.0):
    path, _, _ = tiny
    processor, vlm = R.load_model(path, torch.device("cpu"), torch.float32)
    torch.manual_seed(0)
    return R.Policy(vlm, processor, temperature, thought_coef)


def prompts_of(policy, task, infos, cot=True):
    names = envs.TASKS[task].action_names
    return [
        R.chat_prompt(policy.processor, R.build_prompt(task, info, names, cot)) for info in infos
    ]


def test_tiny_model_is_deterministic_and_round_trips(tiny, tmp_path):
    path, processor, vlm = tiny
    again = B.build_tiny_model(str(tmp_path), seed=0)
    _, vlm2 = R.load_model(again, torch.device("cpu"), torch.float32)
    assert all(
        torch.equal(a, b) for a, b in zip(vlm.state_dict().values(), vlm2.state_dict().values())
    )
    text = '{"thoughts": "numbers are 10, 2", "action": "+"}'
    assert (
        processor.tokenizer.decode(processor.tokenizer(text, add_special_tokens=False).input_ids)
        == text
    )


def test_tiny_vocabulary_covers_every_prompt_and_answer(tiny):
    tok = tiny[1].tokenizer
    rng = np.random.default_rng(7)
    for task, cls in envs.TASKS.items():
        env = cls()
        for seed in range(5000, 5030):  # seeds the corpus never saw
            _, info = env.reset(seed=seed)
            for _ in range(8):
                texts = [R.build_prompt(task, info, cls.action_names, cot) for cot in (True, False)]
                texts += [R.answer_text(task, info, a, True) for a in cls.action_names]
                for text in texts:
                    ids = tok(text, add_special_tokens=False).input_ids
                    assert tok.unk_token_id not in ids, (task, text)
                _, _, term, trunc, info = env.step(int(rng.integers(len(cls.action_names))))
                if term or trunc:
                    break


def test_thoughts_state_what_the_decision_turns_on():
    import rl4vlm_min as R

    rng = np.random.default_rng(0)
    ez, bj = EZPoints(), Blackjack()
    for seed in range(300):  # EZPoints: the plan's next token is the oracle's action
        _, info = ez.reset(seed=seed)
        for _ in range(int(rng.integers(4))):
            _, _, done, _, info = ez.step(int(rng.integers(len(ez.action_names))))
            if done:
                _, info = ez.reset(seed=seed)
        plan = R.thought_text("ezpoints", info).split(", ")[-1]
        want = ez.action_names[ez.oracle()]
        if plan == "nothing makes 12 now":
            assert want == "="
        else:
            tokens = plan.removesuffix(" makes 12").split()
            n = len(info["Formula"])
            assert tokens[:n] == info["Formula"] and evaluate(tokens) == 12
            assert (tokens[n] if n < len(tokens) else "=") == want
    for seed in range(300):  # Blackjack: "can bust" iff some card would take the hand over 21
        bj.reset(seed=seed)
        can = any(envs.hand_total(bj.player + [(r, "S")])[0] > 21 for r in range(1, 14))
        thought = R.thought_text("blackjack", bj.info())
        assert thought.endswith("a hit can bust" if can else "a hit cannot bust")


def test_value_input_mean_is_summed_in_fp32_for_a_bf16_model():
    """--value-input mean on a bf16 model: the mean over a long prompt (an image's hundreds of
    tokens) is taken in fp32. Summed in bf16, the sum keeps 8 significant bits and a count of 601
    rounds, an error near the gaps between states' features that the critic must tell apart."""
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(0)
    hidden = (1 + torch.rand(2, 700, 16, generator=g)).to(torch.bfloat16)
    mask = torch.zeros(2, 700)
    mask[0, 99:], mask[1, 300:] = 1, 1  # 601 and 400 prompt tokens (left padding)
    feats = R.Policy.state_features(SimpleNamespace(value_input="mean"), hidden, mask)
    exact = [hidden[i, mask[i] > 0].double().mean(0) for i in range(2)]
    assert feats.dtype == torch.float32 and not feats.requires_grad
    assert torch.allclose(feats.double(), torch.stack(exact), rtol=1e-6, atol=0)


def test_sft_labels_each_state_with_the_oracles_action_in_that_state(tiny):
    """SFT's oracle action is the one for the state its answer shows, also where the random walk
    ended the episode (NumberLine moving onto the target, a Blackjack bust, a Points "="): read
    from the terminal state, "current is 2, target is 3, the target is higher" was taught "-"."""
    tok, seen = tiny[1].tokenizer, 0
    for task, cls in envs.TASKS.items():

        class Tagged(cls):  # every info carries the oracle's action in its own state
            def info(self):
                return {**super().info(), "want": self.action_names[self.oracle()]}

        args = R.parse_args(["--task", task])
        data = R.sft_answers(args, Tagged(), np.random.default_rng(0), 200, 1.0, tok)
        for _, info, ids in data:
            text = tok.decode(ids, skip_special_tokens=True)
            index, parsed = R.parse_action(text, cls.action_names)
            assert parsed and cls.action_names[index] == info["want"], (task, text)
            seen += 1
    assert seen == 800


def test_random_sft_answers_keep_ezpoints_formulas_well_formed(tiny):
    """SFT's random EZPoints actions follow "number operator number =" and leave the operator to
    chance (RL learns which makes 12); in the other games any action may be drawn."""
    env = points(EZPoints, [3, 4])
    moves = [["3", "4"], ["+", "*"], ["3"], ["="]]  # after writing nothing, "4", "4 *", "4 * 3"
    for written, want in zip(["", "4", "*", "3"], moves):
        if written:
            play(env, [written])
        assert [env.action_names[i] for i in env.sensible_actions()] == want, env.formula
    for cls in (NumberLine, Points24, Blackjack):
        assert cls().sensible_actions() == list(range(len(cls.action_names)))

    class Tagged(EZPoints):  # every info carries the well-formed moves of its own state
        def info(self):
            return {**super().info(), "ok": [self.action_names[i] for i in self.sensible_actions()]}

    tok, ops = tiny[1].tokenizer, []
    args = R.parse_args(["--task", "ezpoints", "--sft-oracle-prob", "0"])
    for _, info, ids in R.sft_answers(args, Tagged(), np.random.default_rng(0), 300, 0.0, tok):
        text = tok.decode(ids, skip_special_tokens=True)
        index, parsed = R.parse_action(text, EZPoints.action_names)
        assert parsed and EZPoints.action_names[index] in info["ok"], info
        ops += [EZPoints.action_names[index]] if info["ok"] == ["+", "*"] else []
    assert 0.3 < ops.count("*") / len(ops) < 0.7 and len(ops) > 30, ops  # a coin (all deals)


def test_thoughts_state_drops_the_plan_and_sft_teaches_the_state_only(tiny, monkeypatch):
    """--thoughts state: the thoughts read the state and stop; SFT's answers and every read-out
    check (SFT's log, rollout, evaluation) use them (the ablation of what the plan buys)."""
    import rl4vlm_min as R

    plan_words = {"numberline": "the target is", "ezpoints": "makes 12", "blackjack": "bust"}
    tok, plans = tiny[1].tokenizer, set()
    for task, cls in envs.TASKS.items():
        args = R.parse_args(["--task", task, "--thoughts", "state"])
        data = R.sft_answers(args, cls(), np.random.default_rng(0), 60, 0.0, tok)
        for _, info, ids in data:  # states off the oracle's path too (broken formulas, 3+ cards)
            full, state = R.thought_text(task, info), R.thought_text(task, info, "state")
            text = tok.decode(ids, skip_special_tokens=True)
            assert f'"thoughts": "{state}"' in text, text
            if task == "points24":  # its thoughts hold the numbers only: nothing to drop
                assert state == full
                continue
            plan = full[len(state) + 2 :]
            assert full == f"{state}, {plan}" and plan_words[task] in plan and "," not in plan
            assert plan_words[task] not in state and plan_words[task] not in text, text
            plans.add(plan)
    assert {"nothing makes 12 now", "a hit can bust", "a hit cannot bust"} <= plans, plans
    assert {"the target is higher", "the target is lower"} <= plans, plans
    with pytest.raises(SystemExit):
        R.parse_args(["--thoughts", "none"])
    asked = []  # every read-out check asks for the thoughts SFT taught
    original = R.thought_text
    monkeypatch.setattr(R, "thought_text", lambda *a: asked.append(a[2:]) or original(*a))
    flags = "--thoughts state --sft-steps 1 --sft-batch-size 2 --num-envs 2 --num-steps 1 "
    flags += "--num-minibatches 1"
    args = R.parse_args([*flags.split(), "--eval-episodes", "2", "--max-new-tokens", "16"])
    policy, rng = fresh_policy(tiny), np.random.default_rng(0)
    R.sft_warm_start(policy, args, rng)
    R.rollout(policy, R.new_envs(args, [0, 1]), args, rng, [])
    R.evaluate(policy, args, True, rng)
    assert len(asked) > 6 and set(asked) == {("state",)}, asked


def test_prompt_keeps_image_state_out_of_text():
    nl = R.build_prompt("numberline", {"Target": 4, "Current": 1}, NumberLine.action_names, True)
    assert (
        "4" not in nl
        and "1" not in nl
        and '"-", "+"' in nl
        and nl.index("thoughts") < nl.index('"action"')
    )
    ez = R.build_prompt(
        "ezpoints",
        {"Cards": ["7H", "5S"], "Numbers": [7, 5], "Formula": ["7", "+"]},
        EZPoints.action_names,
        False,
    )
    assert '"7 +"' in ez and "5S" not in ez and "thoughts" not in ez
    bj = R.build_prompt(
        "blackjack",
        {
            "Player Card": ["9H", "8S"],
            "Player Total": 17,
            "Dealer Card": ["KD"],
            "Dealer Total": 10,
        },
        Blackjack.action_names,
        True,
    )
    assert "17" not in bj and "KD" not in bj


def test_lambda_split_on_handmade_answer(tiny):
    policy = fresh_policy(tiny, thought_coef=0.0)
    tok = policy.processor.tokenizer
    thought, action = (
        '{"thoughts": "current is 1, target is 3",',
        ' "action": "+"}',
    )  # ' "' is one token
    ids = tok(thought + action, add_special_tokens=False).input_ids + [tok.eos_token_id]
    n_thought = len(tok(thought, add_special_tokens=False).input_ids)
    weights = policy.token_weights(ids)
    assert weights == [0.0] * n_thought + [1.0] * (len(ids) - n_thought)
    # lambda = 0 counts only the action tokens: equal to the sum of those tokens' log-probs
    env = NumberLine()
    obs, info = env.reset(seed=0)
    with torch.no_grad():
        lp0, _, _, _ = policy.score(
            [obs], prompts_of(policy, "numberline", [info]), [ids], [weights]
        )
        lp_all, _, _, _ = policy.score(
            [obs], prompts_of(policy, "numberline", [info]), [ids], [[1.0] * len(ids)]
        )
        lp_thought, _, _, _ = policy.score(
            [obs], prompts_of(policy, "numberline", [info]), [ids], [[1.0 - w for w in weights]]
        )
    assert torch.allclose(lp0 + lp_thought, lp_all, atol=1e-5) and lp0 > lp_all


def test_action_key_is_found_in_text_whose_lower_case_is_longer():
    """token_weights finds the "action": key case-blind in the decoded text itself: lower() turns
    each 'İ' into two characters, which once sent the search past the text's end (a loop without
    end). Tokens: 20 x 'İ', the thoughts, then the action span (weight 1)."""
    import signal

    pieces = ["İ" * 20, '{"thoughts": "x", ', '"ACTION": "+"}']
    tok = SimpleNamespace(decode=lambda ids, **_: "".join(pieces[i] for i in ids))
    fake = SimpleNamespace(processor=SimpleNamespace(tokenizer=tok), thought_coef=0.5)
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("token_weights did not return"))
    signal.alarm(10)
    try:
        assert R.Policy.token_weights(fake, [0, 1, 2]) == [0.5, 0.5, 1.0]
        assert R.Policy.token_weights(fake, [0, 1]) == [0.5, 0.5]  # no key: all thoughts
    finally:
        signal.alarm(0)


def test_lora_starts_as_identity_and_merges(tiny):
    policy = fresh_policy(tiny)
    env = EZPoints()
    obs, info = env.reset(seed=0)
    batch = policy.encode_prompts([obs], prompts_of(policy, "ezpoints", [info]))
    with torch.no_grad():
        before = policy.vlm(**batch).logits
        n = R.add_lora(policy.vlm, rank=4, alpha=8, dropout=0.0, targets="language")
        assert n == 14  # 2 layers x (q, k, v, o, gate, up, down)
        assert torch.equal(policy.vlm(**batch).logits, before)
        trainable = [name for name, p in policy.vlm.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in name for name in trainable)
        for name, p in policy.vlm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
        adapted = policy.vlm(**batch).logits
        assert not torch.allclose(adapted, before, atol=1e-4)
        checkpoints.merge_lora(policy.vlm)
        assert not any(isinstance(m, R.LoRALinear) for m in policy.vlm.modules())
        assert torch.allclose(policy.vlm(**batch).logits, adapted, atol=1e-4)


def test_scored_logprobs_match_generate_on_left_padded_batch(tiny):
    policy = fresh_policy(tiny, temperature=0.7)
    env = Points24()
    frames, infos = [], []
    for seed, n_tokens in (
        (0, 0),
        (1, 5),
    ):  # different formula lengths -> different prompt lengths -> left padding
        obs, info = env.reset(seed=seed)
        for _ in range(n_tokens):
            obs, _, _, _, info = env.step(10)  # "+" is always appended
        frames.append(obs)
        infos.append(info)
    prompts = prompts_of(policy, "points24", infos)
    batch = policy.encode_prompts(frames, prompts)
    assert (batch["attention_mask"] == 0).any()
    torch.manual_seed(0)
    with torch.no_grad():
        out = policy.vlm.generate(
            **batch,
            do_sample=True,
            temperature=0.7,
            top_k=0,
            top_p=1.0,
            max_new_tokens=12,
            suppress_tokens=policy.banned,
            pad_token_id=policy.pad_id,
            eos_token_id=policy.eos_id,
            output_scores=True,
            return_dict_in_generate=True,
        )
    P = batch["input_ids"].shape[1]
    answers, reported = [], []
    for b in range(2):
        ids = out.sequences[b, P:].tolist()
        ids = ids[: ids.index(policy.eos_id) + 1] if policy.eos_id in ids else ids
        answers.append(ids)
        reported.append(
            sum(out.scores[t][b].log_softmax(-1)[tok].item() for t, tok in enumerate(ids))
        )
    with torch.no_grad():
        scored, _, _, _ = policy.score(frames, prompts, answers, [[1.0] * len(a) for a in answers])
    assert torch.allclose(scored, torch.tensor(reported), atol=1e-3), (scored, reported)


def small_args(tmp, *extra):
    return R.parse_args(
        [
            "--num-envs",
            "4",
            "--num-steps",
            "4",
            "--num-minibatches",
            "2",
            "--micro-batch-size",
            "4",
            "--total-steps",
            "16",
            "--sft-steps",
            "2",
            "--eval-episodes",
            "4",
            "--output-dir",
            str(tmp),
            *extra,
        ]
    )


def one_rollout(policy, args, rng):
    """One rollout of 4 NumberLine envs and its GAE: (data, advantages, returns)."""
    vec = dict(envs=[NumberLine() for _ in range(4)], ep_return=[0.0] * 4, ep_len=[0] * 4)
    first = [env.reset(seed=i) for i, env in enumerate(vec["envs"])]
    vec["obs"], vec["infos"] = [o for o, _ in first], [i for _, i in first]
    data = R.rollout(policy, vec, args, rng, [])
    return (
        data,
        *R.compute_gae(
            data["rewards"], data["values"], data["dones"], data["next_value"], 0.9, 0.95
        ),
    )


def test_ratio_is_one_on_first_minibatch(tiny, tmp_path):
    args = small_args(
        tmp_path, "--update-epochs", "1", "--num-minibatches", "1", "--micro-batch-size", "16"
    )
    policy = fresh_policy(tiny)
    data, adv, ret = one_rollout(policy, args, np.random.default_rng(0))
    optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=1e-4)
    stats = R.ppo_update(
        policy, optimizer, data, adv, ret, args, torch.Generator().manual_seed(0), update=1
    )
    assert (
        stats["first_ratio_dev"] < 1e-4
        and abs(stats["approx_kl"]) < 1e-7
        and stats["clipfrac"] == 0
    )


def test_value_loss_does_not_shrink_the_policy_step(tiny, tmp_path):
    """The VLM's gradient is clipped apart from the value head's: returns 1,000x larger (a huge
    value loss) leave the VLM's update as it is with the returns as they were (the default
    critic's input is detached, so only clipping together could couple them)."""
    args = small_args(
        tmp_path, "--update-epochs", "1", "--num-minibatches", "1", "--micro-batch-size", "16"
    )
    data, adv, ret = one_rollout(fresh_policy(tiny), args, np.random.default_rng(0))
    steps = []
    for returns in (ret, ret * 1000):
        policy = fresh_policy(tiny)
        policy.value_input = "mean"  # the detached input: the value loss reaches the head only
        before = [p.detach().clone() for p in policy.vlm.parameters()]
        optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.1)
        R.ppo_update(policy, optimizer, data, adv, returns, args, torch.Generator(), update=1)
        steps.append([p.detach() - b for p, b in zip(policy.vlm.parameters(), before)])
    assert any(d.abs().max() > 0 for d in steps[0])  # the VLM did move
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(*steps))


def test_value_clip_is_in_return_units_and_off_at_zero(tiny, tmp_path):
    """--vf-clip keeps V within that many return units of its rollout value, pessimistically; 0
    turns the clip off, which is the same as a clip too wide to bind. With returns 100x larger than
    V, a clip of 0.2 binds in the later epochs and the value head ends elsewhere."""
    heads = {}
    for vf_clip in ("0", "1e9", "0.2"):
        args = small_args(tmp_path, "--update-epochs", "3", "--num-minibatches", "1",
                          "--micro-batch-size", "16", "--vf-clip", vf_clip)  # fmt: skip
        if vf_clip == "0":  # one rollout for all three
            data, adv, ret = one_rollout(fresh_policy(tiny), args, np.random.default_rng(0))
        policy = fresh_policy(tiny)
        optimizer = torch.optim.SGD(policy.value_head.parameters(), lr=1.0)  # steps of norm 0.5
        R.ppo_update(policy, optimizer, data, adv, 100 * ret, args, torch.Generator(), update=1)
        heads[vf_clip] = [p.detach().clone() for p in policy.value_head.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(heads["0"], heads["1e9"]))
    assert not all(torch.allclose(a, b) for a, b in zip(heads["0"], heads["0.2"]))
    assert R.parse_args(["--preset", "paper"]).vf_clip == 0.1  # the official code's


PAPER_TINY = [
    "--preset",
    "paper",
    "--num-envs",
    "2",
    "--num-steps",
    "4",
    "--num-minibatches",
    "1",
    "--micro-batch-size",
    "4",
    "--total-steps",
    "16",
    "--sft-steps",
    "4",
    "--sft-lr",
    "1e-2",
    "--max-new-tokens",
    "12",
    "--eval-episodes",
    "2",
    "--lora-rank",
    "8",
]


def test_paper_preset_restores_the_papers_sft_and_ratio_is_one_every_update(tmp_path, capsys):
    """--preset paper (§2): SFT trains every weight at lr 2e-5, LoRA (on every linear layer) comes
    before RL and RL trains the adapters and the value head; advantages normalised once per
    rollout, one gradient clip over both. The first minibatch's ratio is 1 on update 2 too, when
    the adapters are no longer zero."""
    args = R.parse_args(["--preset", "paper"])
    assert (args.sft_lr, args.lora_in_sft, args.adv_norm, args.grad_clip) == (
        2e-5, False, "rollout", "joint"
    )  # fmt: skip
    R.main([*PAPER_TINY, "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    sft_line = next(line for line in out.splitlines() if line.startswith("SFT trains"))
    rl_line = next(line for line in out.splitlines() if line.startswith("RL trains"))
    assert "every weight" in sft_line and "LoRA rank 8 adapters" in rl_line, out
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # dropout left on in the update gave |ratio - 1| = 0.97 and 1.00 here; off: 0 (fp32 batch shapes: ~1e-5)
    assert len(rows) == 2 and all(r["first_ratio_dev"] < 1e-4 for r in rows), [
        r["first_ratio_dev"] for r in rows
    ]


def test_advantages_are_normalised_per_rollout_or_per_minibatch(tiny, tmp_path):
    """--adv-norm rollout (the paper's): one mean and std over the whole batch, so a minibatch keeps
    its offset; minibatch: every minibatch is centred. Seen through SGD on the policy loss alone:
    the two differ, and rollout normalisation equals normalising the advantages by hand first."""
    base = ["--update-epochs", "1", "--num-minibatches", "4", "--micro-batch-size", "4"]
    base += ["--vf-coef", "0", "--kl-coef", "0", "--grad-clip", "joint", "--max-grad-norm", "1e9"]
    steps = {}
    for norm in ("minibatch", "rollout", "none"):
        args = small_args(tmp_path, *base, "--adv-norm", "rollout" if norm == "none" else norm)
        data, adv, ret = one_rollout(fresh_policy(tiny), args, np.random.default_rng(0))
        if norm == "none":  # normalised by hand, then rollout normalisation is the identity
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        policy = fresh_policy(tiny)
        before = [p.detach().clone() for p in policy.vlm.parameters()]
        optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.1)
        R.ppo_update(policy, optimizer, data, adv, ret, args, torch.Generator(), update=1)
        steps[norm] = [p.detach() - b for p, b in zip(policy.vlm.parameters(), before)]
    assert not all(torch.allclose(a, b) for a, b in zip(steps["minibatch"], steps["rollout"]))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(steps["rollout"], steps["none"]))


@pytest.mark.parametrize("lora_in_sft", [False, True])
def test_notebook_order_trains_what_the_cli_trains(tmp_path, lora_in_sft):
    """The notebook calls setup -> sft_warm_start -> start_rl; with --preset paper that must train
    every weight in SFT and add the adapters before RL (or, with --lora-in-sft, before SFT)
    exactly as train() does, and RL trains the same parameters with or without SFT before it."""
    counts = []
    extra = ["--lora-in-sft"] if lora_in_sft else []
    for k in range(2):
        args = R.parse_args(
            [*PAPER_TINY, *extra, "--sft-steps", "1", "--output-dir", str(tmp_path / str(k))]
        )
        policy, rng, _, _ = R.setup(args)
        if k == 0:
            R.sft_warm_start(policy, args, rng)
        sft = sum(p.numel() for p in policy.vlm.parameters() if p.requires_grad) if k == 0 else None
        optimizer = R.start_rl(policy, args)
        assert optimizer.param_groups[0]["betas"] == (0.9, 0.999)  # the paper's (torch's) Adam
        n_lora = sum(isinstance(m, R.LoRALinear) for m in policy.modules())
        counts.append((n_lora, sum(p.numel() for g in optimizer.param_groups for p in g["params"])))
        base = sum(p.numel() for n, p in policy.vlm.named_parameters() if ".lora_" not in n)
        assert k == 1 or (sft < 0.5 * base if lora_in_sft else sft == base)
    assert counts[0] == counts[1] and counts[0][0] > 0


def test_checkpoint_sampling_settings_do_not_leak_into_generate(tmp_path):
    """A checkpoint whose generation_config ships a repetition penalty and top-k: the sampled tokens' log-probs
    (generate's own processed scores) equal the ones Policy.score computes."""
    path = B.build_tiny_model(str(tmp_path / "model"), seed=0)
    gen = transformers.GenerationConfig.from_pretrained(path)
    gen.repetition_penalty, gen.top_k, gen.do_sample, gen.temperature = 3.0, 3, True, 2.0
    gen.save_pretrained(path)
    processor, vlm = R.load_model(path, torch.device("cpu"), torch.float32)
    policy = R.Policy(vlm, processor, 1.0, 0.5)
    env = NumberLine()
    frames, infos = zip(*[env.reset(seed=s) for s in range(4)])
    prompts = prompts_of(policy, "numberline", infos)
    batch = policy.encode_prompts(frames, prompts)
    torch.manual_seed(0)
    with torch.no_grad():
        out = policy.vlm.generate(
            **batch,
            generation_config=checks.sampling_config(policy, False, 16),
            output_scores=True,
            return_dict_in_generate=True,
        )
    torch.manual_seed(0)
    played = policy.generate(
        list(frames), prompts, False, 16
    )  # what the rollout samples: the same tokens
    n_prompt, answers, sampled = batch["input_ids"].shape[1], [], []
    for b in range(4):
        ids = out.sequences[b, n_prompt:].tolist()
        ids = ids[: ids.index(policy.eos_id) + 1] if policy.eos_id in ids else ids
        answers.append(ids)
        sampled.append(
            sum(out.scores[t][b].log_softmax(-1)[tok].item() for t, tok in enumerate(ids))
        )
    assert answers == played
    with torch.no_grad():
        scored, _, _, _ = policy.score(
            list(frames), prompts, answers, [[1.0] * len(a) for a in answers]
        )
    assert torch.allclose(scored, torch.tensor(sampled), atol=1e-4), (scored, sampled)


def test_critic_reads_the_state_not_the_answer(tiny):
    """The value head's input differs across NumberLine frames whose prompt text is the same (so the image is
    what differs), and V(s) does not change with the answer that follows the prompt."""
    path, _, _ = tiny
    processor, vlm = R.load_model(path, torch.device("cpu"), torch.float32)
    policy = R.Policy(vlm, processor, 1.0, 0.5, value_input="mean")
    seen = []
    policy.value_head.register_forward_pre_hook(
        lambda module, inputs: seen.append(inputs[0].detach())
    )
    frames, infos = zip(*[numberline(t, c).obs() for t, c in ((0, 5), (5, 0), (2, 3), (3, 2))])
    prompts = prompts_of(policy, "numberline", infos)
    assert len(set(prompts)) == 1  # the numbers are in the frame only
    values = policy.value(list(frames), prompts)
    features = seen[-1]  # (4, H)
    spread = (features - features.mean(0)).abs().max(1).values
    assert (spread > 1e-3 * features.abs().mean()).all(), spread
    answers = [
        processor.tokenizer(
            R.answer_text("numberline", infos[0], a, True), add_special_tokens=False
        ).input_ids
        for a in ("+", "-")
    ]
    with torch.no_grad():
        v = [
            policy.score([frames[0]], prompts[:1], [ids], [[1.0] * len(ids)])[1] for ids in answers
        ]
    assert torch.allclose(v[0], v[1]) and torch.allclose(v[0], values[:1], atol=1e-5)


# ---- THE TINY MODEL: its recipe's targets and stages, the shipped folder, the recipe's key ----
def test_vision_probe_targets_name_each_card_at_its_patch():
    grid = B.TINY_VISION["image_size"] // B.TINY_VISION["patch_size"]
    env = points(Points24, [12, 1, 10, 7])  # Q A 10 7: values 10, 1, 10, 7 from left to right
    target = B.patch_values(env, grid).view(grid, grid)
    row = target[(target > 0).any(1)]  # the one grid row that holds the ranks
    assert row.shape[0] == 1 and row[0][row[0] > 0].tolist() == [10, 1, 10, 7]
    bj = Blackjack()
    bj.reset(seed=0)
    values = B.patch_values(bj, grid)
    assert (values == 11).sum() == 1  # the dealer's hidden card: face down, never its value
    assert (values > 0).sum() == 4  # two dealer cards, two of the player's


def test_pretraining_trains_the_tower_and_the_language_model(tmp_path, monkeypatch):
    monkeypatch.setitem(B.TINY_PRETRAIN, "vision_steps", 2)
    monkeypatch.setitem(B.TINY_PRETRAIN, "vision_batch", 4)
    monkeypatch.setitem(B.TINY_PRETRAIN, "batch_size", 4)
    path = B.build_tiny_model(str(tmp_path), seed=0)
    _, before = R.load_model(path, torch.device("cpu"), torch.float32)
    threads_inside, describe = [], B.pretrain_describe

    def spy(*args):
        threads_inside.append(torch.get_num_threads())
        return describe(*args)

    monkeypatch.setattr(B, "pretrain_describe", spy)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        B.pretrain_tiny(path, steps=2)
        # one thread inside, whatever the machine has (the same model everywhere); restored after
        assert threads_inside == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    _, after = R.load_model(path, torch.device("cpu"), torch.float32)
    moved = {
        name.split(".")[1]
        for (name, a), b in zip(before.named_parameters(), after.parameters())
        if not torch.equal(a, b)
    }
    assert {"vision_tower", "multi_modal_projector", "language_model"} <= moved


def test_shipped_tiny_model_was_built_by_the_current_recipe():
    """tiny-llava/ records the key of the recipe that built it: change the recipe (its settings,
    or the code that builds, draws, prompts, loads or scores) without rebuilding, and this fails.
    Its model card names the machine and the versions that built it, and its read-out."""
    with open(os.path.join(R.TINY_MODEL, "recipe.json")) as f:
        built = json.load(f)
    assert built["key"] == B.recipe_key(built["steps"]), (
        "the recipe changed since tiny-llava/ was built: run python build_tiny_llava.py (or, on "
        f"Python {sys.version.split()[0]}, not the {built['versions']['python']} that built it, "
        "the syntax tree the key hashes may be written out differently)"
    )
    assert built["steps"] == 3000 and built["torch_threads"] == 1
    card = open(os.path.join(R.TINY_MODEL, "README.md")).read()
    assert built["key"] in card and built["cpu"] in card and built["versions"]["torch"] in card
    # a build that reads every game (greedy, 50 held-out states each), as the issue asks
    assert built["readout"]["numberline"] == 1.0 and built["readout"]["blackjack"] >= 0.75
    assert min(built["readout"]["ezpoints"], built["readout"]["points24"]) >= 0.95


def test_shipped_tiny_model_loads_with_from_pretrained_and_reads_the_frame():
    """--model tiny is a plain folder: the Auto* classes load it, and it answers a NumberLine
    frame in the games' format with its state read right (what the build taught it)."""
    processor, vlm = R.load_model("tiny", torch.device("cpu"), torch.float32)
    assert type(vlm).__name__ == "LlavaForConditionalGeneration"
    policy = R.Policy(vlm, processor, 1.0, 0.5)
    env = NumberLine()
    frames, infos = zip(*(env.reset(seed=s) for s in range(5000, 5008)))
    answers = policy.generate(list(frames), prompts_of(policy, "numberline", infos), True, 48)
    texts = [processor.tokenizer.decode(a, skip_special_tokens=True) for a in answers]
    assert all(R.parse_action(t, env.action_names)[1] for t in texts), texts
    assert all(R.thought_text("numberline", i) in t for i, t in zip(infos, texts)), texts


def test_missing_tiny_folder_says_what_to_do(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(R, "TINY_MODEL", str(tmp_path / "tiny-llava"))
    with pytest.raises(SystemExit) as e:
        R.load_model("tiny", torch.device("cpu"), torch.float32)
    assert e.value.code == 2 and "python build_tiny_llava.py" in capsys.readouterr().err


def test_recipe_key_covers_every_setting_that_shapes_the_model(monkeypatch):
    """The key changes with each constant the build reads (a key blind to one of them would pass
    a stale folder): the vision geometry, chat template, tokenizer split, pretraining settings,
    rules; and with the code of the lecture's functions that the build runs."""
    key = B.recipe_key(3000)
    assert B.recipe_key(0) != key
    changes = [
        (B, "TINY_TEMPLATE", B.TINY_TEMPLATE + " "),
        (B, "TINY_SPLIT", B.TINY_SPLIT + "|x"),
        (B, "TINY_PRETRAIN", {**B.TINY_PRETRAIN, "vision_steps": 1}),
        (B, "TINY_VISION", {**B.TINY_VISION, "patch_size": 8}),
        (R, "GAME_RULES", {**R.GAME_RULES, "numberline": "Play."}),
    ]
    for module, name, value in changes:
        with monkeypatch.context() as m:
            m.setattr(module, name, value)
            assert B.recipe_key(3000) != key, name
    with monkeypatch.context() as m:  # the code: a function the build calls, rewritten
        m.setattr(B, "code_text", lambda obj: "changed" if obj is R.thought_text else "")
        changed = B.recipe_key(3000)
        m.setattr(B, "code_text", lambda obj: "")
        assert changed != B.recipe_key(3000)
    assert B.recipe_key(3000) == key


def _plus_one(x):
    """A docstring."""
    return x + 1  # a comment


def _plus_one_rewritten(x):
    # another comment, another layout, no docstring
    return (
        x + 1
    )  # fmt: skip


def _plus_two(x):
    """A docstring."""
    return x + 2  # a comment


def test_tiny_model_key_reads_the_code_not_its_comments():
    """The key hashes each function's syntax tree without docstrings: a comment, a docstring or a
    layout edited keeps the recipe's key; a change of what the code does changes it."""
    text = lambda f: B.code_text(f).replace(f.__name__, "f")  # noqa: E731
    assert text(_plus_one) == text(_plus_one_rewritten)
    assert text(_plus_one) != text(_plus_two)
    assert "A docstring" not in B.code_text(_plus_one)


def test_kl_to_the_reference_is_zero_until_the_policy_moves(tiny, tmp_path):
    """--kl-coef: the reference is a frozen copy of the policy at RL start, so kl_ref is exactly 0 on the first
    minibatch, > 0 once the policy has taken a step, and the reference itself never changes."""
    args = small_args(
        tmp_path,
        "--kl-coef",
        "0.1",
        "--update-epochs",
        "1",
        "--num-minibatches",
        "1",
        "--micro-batch-size",
        "16",
    )
    policy = fresh_policy(tiny)
    optimizer = R.start_rl(policy, args)
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.99)  # --adam-beta2, the tiny default
    frozen = {k: v.clone() for k, v in policy.reference.state_dict().items()}
    data, adv, ret = one_rollout(policy, args, np.random.default_rng(0))
    first = R.ppo_update(
        policy, optimizer, data, adv, ret, args, torch.Generator().manual_seed(0), update=1
    )
    second = R.ppo_update(
        policy, optimizer, data, adv, ret, args, torch.Generator().manual_seed(0), update=2
    )
    assert first["kl_ref"] == 0.0 and second["kl_ref"] > 1e-6, (first["kl_ref"], second["kl_ref"])
    assert all(torch.equal(v, policy.reference.state_dict()[k]) for k, v in frozen.items())
    assert not any(p.requires_grad for p in policy.reference.parameters())


def test_nan_stops_the_update_with_a_message(tiny, tmp_path):
    args = small_args(tmp_path)
    policy = fresh_policy(tiny)
    data, adv, ret = one_rollout(policy, args, np.random.default_rng(0))
    with torch.no_grad():
        policy.value_head[-1].bias.fill_(float("nan"))
    optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=1e-4)
    with pytest.raises(FloatingPointError, match="the value is NaN or inf at update 7, epoch 0"):
        R.ppo_update(
            policy, optimizer, data, adv, ret, args, torch.Generator().manual_seed(0), update=7
        )


def test_entropy_bonus_changes_the_gradient(tiny):
    policy = fresh_policy(tiny)
    env = NumberLine()
    obs, info = env.reset(seed=0)
    ids = policy.generate([obs], prompts_of(policy, "numberline", [info]), False, 10)
    grads = []
    for ent_coef in (0.0, 1.0):
        policy.zero_grad()
        logprob, value, entropy, _ = policy.score(
            [obs], prompts_of(policy, "numberline", [info]), ids, [[1.0] * len(ids[0])]
        )
        (logprob.sum() * 0 - ent_coef * entropy.mean()).backward()
        grads.append(policy.vlm.get_output_embeddings().weight.grad.abs().sum().item())
    assert grads[0] == 0 and grads[1] > 0


# ---- THE CLI ----
def run_cli(*argv, timeout=600):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, os.path.join(HERE, "rl4vlm_min.py"), *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=HERE,
    )


TINY_RUN = [
    "--num-envs",
    "4",
    "--num-steps",
    "4",
    "--num-minibatches",
    "2",
    "--micro-batch-size",
    "4",
    "--total-steps",
    "32",
    "--sft-steps",
    "3",
    "--eval-episodes",
    "4",
    "--max-new-tokens",
    "24",
]


def test_cli_end_to_end_and_deterministic(tmp_path):
    runs = []
    for k in range(2):
        out = tmp_path / f"run{k}"
        proc = run_cli("--task", "ezpoints", *TINY_RUN, "--output-dir", str(out))
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "before RL" in proc.stdout and "after RL" in proc.stdout
        summary = json.loads((out / "summary.json").read_text())
        for key in (
            "eval_success_before_rl",
            "eval_success_after_rl",
            "eval_greedy_success_before_rl",
            "eval_greedy_success_after_rl",
            "random_success",
            "oracle_success",
        ):
            assert 0.0 <= summary[key] <= 1.0, key
        assert summary["env_steps"] == 32
        for name in (
            "metrics.jsonl",
            "learning_curve.png",
            "checkpoint/policy.safetensors",
            "checkpoint/state.pt",
            "final_model/config.json",
            "final_model/value_head.safetensors",
        ):
            assert (out / name).exists(), name
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 2
        runs.append(
            (
                [{k: v for k, v in r.items() if k != "steps_per_second"} for r in rows],
                {k: v for k, v in summary.items() if k != "wall_seconds"},
            )
        )
    assert runs[0] == runs[1]


def test_help_lists_the_kebab_case_flags(capsys):
    with pytest.raises(SystemExit) as stop:
        R.main(["--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0
    assert "--num-envs" in out and "--sft-readout-steps" in out and "--no-cot" in out
    assert "--num_envs" not in out and "--no_cot" not in out
    assert R.parse_args(["--num_envs", "4"]).num_envs == 4  # the snake_case spelling still works


def test_sft_readout_steps_minus_one_is_half_of_the_games_sft():
    """-1 is resolved after the game's defaults: Blackjack's 2,000 SFT steps give 1,000."""
    assert R.parse_args(["--task", "blackjack", "--sft-readout-steps", "-1"]).sft_readout == 1000
    args = R.parse_args(["--task", "blackjack", "--sft-readout-steps", "-1", "--sft-steps", "300"])
    assert args.sft_readout == 150
    assert R.parse_args(["--task", "blackjack", "--sft-readout-steps", "7"]).sft_readout == 7


def test_training_seeds_stay_below_the_evaluation_seeds(monkeypatch, capsys):
    """The largest --seed that parse_args accepts still gives training envs (the seeds ppo_loop
    hands to new_envs) below the first evaluation seed; one more is refused."""
    seen = []

    def spy(args, seeds):
        seen.extend(seeds)
        raise StopIteration  # stop ppo_loop right there

    monkeypatch.setattr(R, "new_envs", spy)
    wide = ["--num-steps", "1", "--total-steps", "2000"]  # 1,000 envs, one batch
    for argv in (["--seed", "999"], ["--seed", "499", "--num-envs", "1000", *wide]):
        with pytest.raises(StopIteration):
            R.ppo_loop(None, None, R.parse_args(argv), None, None)
    assert seen and max(seen) < R.EVAL_SEED
    with pytest.raises(SystemExit):
        R.parse_args(["--seed", "999", "--num-envs", "1001", *wide])
    assert "--seed must be in 0..998" in capsys.readouterr().err


def test_setup_line_gives_the_vlm_and_the_value_head_apart(tmp_path, capsys):
    policy, _, _, shape = R.setup(small_args(tmp_path))
    line = capsys.readouterr().out
    n_vlm = sum(p.numel() for p in policy.vlm.parameters())
    n_head = sum(p.numel() for p in policy.value_head.parameters())
    assert f"VLM {n_vlm / 1e6:.2f}M params + value head {n_head / 1e6:.2f}M" in line, line
    assert f"prompt {shape[0]} tokens ({shape[1]} image)" in line


def test_game_defaults_then_paper_preset_then_typed_flags():
    """--task X sets X's row of GAME_DEFAULTS, --preset paper then the paper's values, and a typed
    flag wins over both (Points24's gamma: 1.0 of its own, 0.9 the paper's and the other games')."""
    for task, row in R.GAME_DEFAULTS.items():
        args = R.parse_args(["--task", task])
        assert {key: getattr(args, key) for key in row} == row
    assert R.parse_args(["--task", "points24"]).gamma == 1.0
    assert R.parse_args(["--task", "numberline"]).gamma == 0.9
    assert R.parse_args(["--task", "points24", "--preset", "paper"]).gamma == 0.9
    assert R.parse_args(["--task", "points24", "--gamma", "0.95"]).gamma == 0.95
    assert R.parse_args(["--task", "points24", "--preset", "paper", "--gamma=1"]).gamma == 1.0
    assert R.parse_args(["--task", "ezpoints"]).thoughts == "state"  # the plan would decide for RL
    assert R.parse_args(["--task", "ezpoints", "--thoughts", "plan"]).thoughts == "plan"
    for task, steps in [("numberline", 512), ("points24", 1024)]:  # the paper's steps per update
        for typed in ([], ["--num-envs", "8"]):  # over its 4 envs or however many are typed
            args = R.parse_args(["--task", task, "--preset", "paper", *typed])
            assert (args.batch_size, args.num_minibatches) == (steps, steps // 128)


@pytest.mark.parametrize("task", envs.TASKS)
def test_each_game_default_configuration_completes(task, tmp_path):
    """Each game's default settings (SFT oracle share, critic input, KL reference) on a tiny schedule."""
    R.main(
        [
            "--task",
            task,
            "--num-envs",
            "2",
            "--num-steps",
            "2",
            "--num-minibatches",
            "2",
            "--micro-batch-size",
            "2",
            "--total-steps",
            "8",
            "--sft-steps",
            "2",
            "--eval-episodes",
            "2",
            "--max-new-tokens",
            "16",
            "--output-dir",
            str(tmp_path),
        ]
    )
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # the exact KL is >= 0; float sums leave it a few 1e-9 below when the policy has not moved
    assert len(rows) == 2 and all(np.isfinite(r["kl_ref"]) and r["kl_ref"] > -1e-6 for r in rows)
    assert json.loads((tmp_path / "summary.json").read_text())["task"] == task


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--task", "chess"], "task"),
        (["--learning-rate", "-1"], "learning rate"),
        (["--num-steps", "0"], "num-steps"),
        (["--num-minibatches", "200"], "num-minibatches"),
        (["--adam-beta2", "1"], "adam-beta2"),
        (["--minibatch-size", "4"], "unknown argument '--minibatch-size'; did you mean --num-mini"),
        (["--num-env", "4"], "did you mean --num-envs?"),
        (["--seed", "1000"], "--seed must be in 0..999"),
        (["--lora-in-sft"], "--lora-in-sft trains the adapters only: give it a --lora-rank > 0"),
    ],
)
@pytest.mark.filterwarnings("error")  # a warning would reach a user's stderr: fail on it here
def test_bad_flag_values_exit_2_with_one_line_in_process(argv, message, capsys, monkeypatch):
    """Caught while parsing: in this process (a subprocess would spend ~10 s importing torch)."""
    monkeypatch.setattr(R, "train", lambda args: pytest.fail(f"{argv} got past parsing"))
    with pytest.raises(SystemExit) as stop:
        R.main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--task", "chess"], "task"),  # a parse error, as a user meets it
        (["--model", "/no/such/model", "--sft-steps", "0"], "cannot load"),
        (["--output-dir", "/proc/no/such/dir"], "cannot write"),
        (["--resume", "/no/such/run"], "holds no checkpoint"),
    ],
)
def test_cli_bad_values_exit_2_with_one_line_as_a_command(argv, message):
    """The real command: nothing else (a warning, a traceback) reaches stderr."""
    proc = run_cli(*argv, timeout=120)
    assert (
        proc.returncode == 2
        and message in proc.stderr
        and len(proc.stderr.strip().splitlines()) == 1
    ), proc.stderr


# ---- THE NOTEBOOK: executed top to bottom; its run time shows in pytest's --durations report ----
def notebook_text(nb):
    return "".join(
        out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
    )


def test_notebook_runs_top_to_bottom():
    import nbformat
    from nbclient import NotebookClient

    # every cell runs, on a copy (the stored outputs stay); a cell inserted after the lecture's
    # settings shortens its schedule, so that CI stays short: the lecture cells stay as they are
    nb = nbformat.read(os.path.join(HERE, "NOTEBOOK.ipynb"), as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    (where,) = [i for i, c in enumerate(nb.cells) if "args = R.parse_args(ARGV)" in c.source]
    short = "args = R.parse_args([*ARGV, '--sft-steps', '30', '--total-steps', '128', "
    short += "'--eval-episodes', '20'])"
    # the lecture sets 2 torch threads; under the README's `pytest -n 2` the kernel takes 1, as
    # this worker does (the other worker uses the second core)
    short += f"\ntorch.set_num_threads({min(2, torch.get_num_threads())})"
    nb.cells.insert(where + 1, nbformat.v4.new_code_cell(short))
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": HERE}}
    ).execute()
    text = notebook_text(nb)
    assert "after RL" in text and "notebook ran in" in text
    print(text[text.index("eval success") :])


def test_notebook_outputs_come_from_the_current_code():
    """The stored outputs (a lecture-schedule run) name the code digest they came from: a change to
    the lecture files without rerunning the notebook fails here."""
    import hashlib

    import nbformat

    nb = nbformat.read(os.path.join(HERE, "NOTEBOOK.ipynb"), as_version=4)
    text = notebook_text(nb)
    assert "eval success (100 episodes)" in text, "commit the notebook with a lecture run's outputs"
    # the code the notebook runs, and the model it loads (its last cell hashes the same files)
    files = ("rl4vlm_min.py", "envs.py", "checks.py", "parallel.py", "checkpoints.py")
    files += ("report.py", "tiny-llava/model.safetensors")
    blob = b"".join(open(os.path.join(HERE, f), "rb").read() for f in files)
    digest = hashlib.sha1(blob).hexdigest()[:12]
    assert f"code digest {digest}" in text, (
        "NOTEBOOK.ipynb's outputs come from older code: rerun it (jupyter execute --inplace "
        "NOTEBOOK.ipynb) and commit it"
    )


def test_stored_notebook_shows_every_figure():
    """Each cell that draws a figure (plt.show()) stores at least one image: a helper that switched
    matplotlib's backend once left the curve and the gallery cells empty."""
    import nbformat

    nb = nbformat.read(os.path.join(HERE, "NOTEBOOK.ipynb"), as_version=4)
    figure_cells = [c for c in nb.cells if c.cell_type == "code" and "plt.show()" in c.source]
    assert len(figure_cells) >= 4
    for cell in figure_cells:
        images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
        assert images, f"a figure cell stores no image: {cell.source[:80]!r}"


def test_plot_curve_leaves_matplotlib_backend_alone(tmp_path, monkeypatch):
    import matplotlib

    def refuse(*_, **__):
        raise AssertionError("plot_curve switched matplotlib's backend")

    monkeypatch.setattr(matplotlib, "use", refuse)
    history = [dict(env_steps=128 * k, success=k / 4, format_error_rate=0.0) for k in (1, 2)]
    report.plot_curve(history, tmp_path / "curve.png", "t", {"random": 0.3})
    assert (tmp_path / "curve.png").stat().st_size > 1000


def test_imports_run_one_way():
    """envs.py imports no project module; no module imports one that imports it back (no cycle,
    no sys.modules aliasing); the lecture fits its budget."""
    import ast

    files = subprocess.check_output(["git", "ls-files", "*.py"], cwd=HERE, text=True).split()
    files = [f for f in files if not os.path.basename(f).startswith("test") and "/" not in f]
    mods = {os.path.splitext(f)[0]: f for f in files}
    graph = {}
    for name, path in mods.items():
        tree = ast.parse(open(os.path.join(HERE, path)).read())
        deps = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        deps |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        graph[name] = {d.split(".")[0] for d in deps} & set(mods) - {name}
        assert "sys.modules[" not in open(os.path.join(HERE, path)).read(), path

    def reach(name, seen):
        for dep in graph[name]:
            assert dep not in seen, f"import cycle: {' -> '.join(seen + [dep])}"
            reach(dep, seen + [dep])

    for name in graph:
        reach(name, [name])
    assert graph["envs"] == set() and "rl4vlm_min" not in set().union(
        *(graph[m] for m in ("checks", "parallel", "checkpoints", "report"))
    )
    lines = open(os.path.join(HERE, "rl4vlm_min.py")).read().splitlines()
    assert len(lines) <= 900 and max(map(len, lines)) <= 100


def test_every_file_the_docs_link_exists():
    """Images and files linked from README.md and results/*.md are in the repository (a figure
    named in the README but never committed shows as a broken image)."""
    import glob
    import re

    docs = [os.path.join(HERE, "README.md"), *glob.glob(os.path.join(HERE, "results", "*.md"))]
    missing = []
    for doc in docs:
        for target in re.findall(r"\]\(([^)#\s]+)[^)]*\)", open(doc).read()):
            if "://" not in target and not os.path.exists(
                os.path.join(os.path.dirname(doc), target)
            ):
                missing.append(f"{os.path.relpath(doc, HERE)}: {target}")
    assert not missing, f"linked but not in the repository: {missing}"


# ---- ROBUSTNESS: hostile inputs, interrupted checkpoint writes ----
def test_envs_take_20k_random_actions():
    rng = np.random.default_rng(0)
    for cls in envs.TASKS.values():
        env = cls()
        obs, _ = env.reset(seed=0)
        for step in range(5_000):
            obs, reward, terminated, truncated, info = env.step(
                int(rng.integers(env.action_space.n))
            )
            if step % 50 == 0:  # the space check costs more than the step: sample it
                assert env.observation_space.contains(obs)
            assert isinstance(reward, float) and isinstance(info, dict)
            if terminated or truncated:
                obs, _ = env.reset()


def test_parser_takes_100k_hostile_strings():
    rng = np.random.default_rng(1)
    pieces = [
        '"action":',
        '"action": "',
        '"',
        "\\",
        "{",
        "}",
        "10",
        "1",
        "+",
        "-",
        "stand",
        "hit",
        " ",
        "\n",
        "\u00e9",
        "\U0001f600",
        "\ud800",
        "\x00",
        "ACTION",
        '"action":"action":',
    ]
    for k in range(100_000):
        text = "".join(rng.choice(pieces, size=int(rng.integers(0, 30))))
        if k % 5000 == 0:
            text = text * 20_000 + '"action": "+"'  # huge
        for names in (NumberLine.action_names, Points24.action_names, Blackjack.action_names):
            index, ok = R.parse_action(text, names, rng)
            assert 0 <= index < len(names)


def test_interrupted_checkpoint_write_keeps_the_old_one(tiny, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    policy = fresh_policy(tiny)
    checkpoints.write_checkpoint(policy, {"update": 1}, dict(update=1), str(tmp_path))
    saved = load_file(tmp_path / "checkpoint" / "policy.safetensors")
    with torch.no_grad():
        policy.value_head[-1].bias.add_(1.0)

    def crash(*a, **k):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", crash)  # dies after the weights, before the state file
    with pytest.raises(KeyboardInterrupt):
        checkpoints.write_checkpoint(policy, {"update": 2}, dict(update=2), str(tmp_path))
    again = load_file(tmp_path / "checkpoint" / "policy.safetensors")
    assert all(torch.equal(saved[k], again[k]) for k in saved)
    assert json.loads((tmp_path / "checkpoint" / "meta.json").read_text())["update"] == 1
    assert not [
        p for p in tmp_path.iterdir() if p.name.startswith(".checkpoint-")
    ]  # no half-written leftovers


def test_env_state_round_trips():
    rng = np.random.default_rng(0)
    for cls in envs.TASKS.values():
        a, b = cls(), cls()
        a.reset(seed=3)
        a.step(0)
        checkpoints.set_env_state(b, checkpoints.env_state(a))
        for _ in range(100):  # same moves, same frames, rewards and deals, across resets
            action = int(rng.integers(a.action_space.n))
            (obs_a, *rest_a), (obs_b, *rest_b) = a.step(action), b.step(action)
            assert np.array_equal(obs_a, obs_b) and rest_a == rest_b
            if rest_a[1] or rest_a[2]:
                a.reset(), b.reset()


RUN3 = [
    "--num-envs",
    "4",
    "--num-steps",
    "4",
    "--num-minibatches",
    "2",
    "--micro-batch-size",
    "4",
    "--total-steps",
    "48",
    "--sft-steps",
    "3",
    "--eval-episodes",
    "4",
    "--max-new-tokens",
    "24",
    "--save-every",
    "1",
]  # 3 updates


def test_nan_stops_the_run_and_resume_equals_the_uninterrupted_run(tmp_path, monkeypatch, capsys):
    def outcome(out):
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((out / "summary.json").read_text())
        return (
            [{k: v for k, v in r.items() if k != "steps_per_second"} for r in rows],
            {k: v for k, v in summary.items() if k != "wall_seconds"},
        )

    full, cut = tmp_path / "full", tmp_path / "cut"
    R.main([*RUN3, "--output-dir", str(full)])
    real_rollout = R.rollout

    def poisoned(policy, vec, args, rng, episodes, update=0):
        if update == 2:  # a NaN appears in the second update's rollout
            with torch.no_grad():
                policy.value_head[-1].bias.fill_(float("nan"))
        return real_rollout(policy, vec, args, rng, episodes, update)

    monkeypatch.setattr(R, "rollout", poisoned)
    with pytest.raises(SystemExit) as stop:
        R.main([*RUN3, "--output-dir", str(cut)])
    assert stop.value.code == 3
    assert (
        "the rollout's log-prob or value is NaN or inf at update 2, rollout step 0"
        in capsys.readouterr().err
    )
    assert (
        json.loads((cut / "checkpoint" / "meta.json").read_text())["update"] == 1
    )  # the last good one is kept
    monkeypatch.undo()
    with pytest.raises(SystemExit) as stop:  # a checkpoint of another task is refused
        R.main(["--task", "ezpoints", "--resume", str(cut)])
    assert stop.value.code == 2 and "made with --task 'numberline'" in capsys.readouterr().err
    R.main(["--resume", str(cut)])
    assert "resumed" in capsys.readouterr().out
    assert outcome(cut) == outcome(full)


# ---- REAL CHECKPOINT FAMILIES: tiny random checkpoints of each, built and saved here, loaded like real ones ----
# image tokens of a 300x300 frame after family_bounds()
# The tiny checkpoints' geometry is unlike any real one's (fixtures/tiny_families.py), so these counts hold only if the bounds
# are derived from each checkpoint's own configuration: LLaVA-NeXT 32 px / patch 8 = 16 tokens a view, base view +
# one tile + 4 row ends = 36 (a hard-coded 336-px tile fails on it).
IMAGE_TOKENS = {
    "llava": 16,
    "llava_next": 36,
    "llava_onevision": 78,
    "qwen2_vl": 81,
    "qwen2_5_vl": 81,
    "idefics3": 16,
    "smolvlm": 4,
}


@pytest.mark.parametrize("family", tiny_families.FAMILIES)
def test_real_family_checkpoint_trains_two_updates(family, tmp_path):
    path = tiny_families.build_tiny_checkpoint(family, str(tmp_path / "model"))
    out = tmp_path / "run"
    R.main(
        [
            "--model",
            path,
            "--task",
            "blackjack",
            "--num-envs",
            "2",
            "--num-steps",
            "2",
            "--num-minibatches",
            "2",
            "--micro-batch-size",
            "1",
            "--total-steps",
            "8",
            "--sft-steps",
            "1",
            "--sft-batch-size",
            "2",
            "--eval-episodes",
            "1",
            "--max-new-tokens",
            "6",
            "--lora-rank",
            "4",
            "--output-dir",
            str(out),
        ]
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["image_tokens"] == IMAGE_TOKENS[family]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # rollout and update score alike: exactly in fp32; in bf16 (CUDA) sums depend on the batch's shape, and an H200
    # gave |ratio - 1| = 5.8e-4 for a micro-batch of 1 against a rollout batch of 2 (0 with equal batches)
    tolerance = (
        5e-3 if torch.cuda.is_available() else 1e-5
    )  # the run is in bf16 on a GPU, fp32 on a CPU
    assert len(rows) == 2 and all(r["first_ratio_dev"] < tolerance for r in rows)
    assert (out / "final_model" / "config.json").exists()


def test_memory_estimate_counts_the_checkpoint_bytes(tmp_path):
    from safetensors import safe_open

    for family in ("llava_next", "qwen2_5_vl", "idefics3"):
        path = tiny_families.build_tiny_checkpoint(family, str(tmp_path / family))
        processor, vlm = R.load_model(path, torch.device("cpu"), torch.float32)
        policy = R.Policy(vlm, processor, 1.0, 0.5)
        with safe_open(
            os.path.join(path, "model.safetensors"), "pt"
        ) as f:  # measured: the bytes on disk
            stored = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys()) * 4  # fp32
        est = report.memory_estimate(policy, small_args(tmp_path), 1, (100, 64))
        value_head = sum(p.numel() * 4 for p in policy.value_head.parameters())
        assert est["weights"] - value_head == stored, family
        assert est["gradients"] == est["weights"] and est["adam state (fp32)"] == 2 * est["weights"]
        assert est["fp32 copies"] == 0  # no LoRA: all trainable, in fp32: no copies
        processor, vlm = R.load_model(path, torch.device("cpu"), torch.bfloat16)
        est = report.memory_estimate(
            R.Policy(vlm, processor, 1.0, 0.5), small_args(tmp_path), 1, (100, 64)
        )
        assert est["weights"] - value_head == stored // 2  # bf16
        assert est["fp32 copies"] == 2 * stored and est["adam state (fp32)"] == 2 * (
            stored + value_head
        )


def test_model_without_chat_template_is_refused(tmp_path):
    path = tiny_families.build_tiny_checkpoint("llava", str(tmp_path / "model"))
    os.remove(os.path.join(path, "chat_template.jinja"))
    proc = run_cli("--model", path, "--output-dir", str(tmp_path / "run"), timeout=120)
    assert proc.returncode == 2 and "no chat template" in proc.stderr, proc.stderr


def test_gradient_checkpointing_keeps_the_gradients_and_saves_less(tiny):
    grads, saved = [], []
    for checkpointing in (False, True):
        policy = fresh_policy(tiny)
        if checkpointing:
            policy.vlm.activation_checkpointing_enable()
        policy.train()
        obs, info = NumberLine().reset(seed=0)
        ids = policy.processor.tokenizer('{"action": "+"}', add_special_tokens=False).input_ids
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t: sizes.append(t.numel() * t.element_size()) or t, lambda t: t
        ):
            logprob, value, _, _ = policy.score(
                [obs] * 4,
                prompts_of(policy, "numberline", [info] * 4),
                [ids] * 4,
                [[1.0] * len(ids)] * 4,
            )
        (logprob.sum() + value.sum()).backward()
        grads.append([p.grad for p in policy.vlm.parameters() if p.grad is not None])
        saved.append(sum(sizes))
    assert len(grads[0]) == len(grads[1]) > 30
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
    assert saved[1] < 0.5 * saved[0]  # the activations kept for the backward pass shrink


def test_dry_run_times_one_step_and_one_update(tmp_path):
    stats = R.train(R.parse_args(["--dry-run", "--num-envs", "4", "--output-dir", str(tmp_path)]))
    assert (
        stats["first_ratio_dev"] < 1e-5 and stats["peak_bytes"] > 0 and stats["update_seconds"] > 0
    )
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "checkpoint").exists()


# ---- DATA PARALLEL: torchrun workers on the CPU (gloo) ----
def averaged_gradient_worker(rank, path, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    parallel.WORLD, parallel.RANK = 2, rank
    processor, vlm = R.load_model(path, torch.device("cpu"), torch.float32)
    torch.manual_seed(0)
    policy = R.Policy(vlm, processor, 1.0, 0.5)
    frames, prompts, answers, advantages = union_minibatch(policy)
    part = slice(2 * rank, 2 * rank + 2)  # each worker holds half of the minibatch
    logprob, _, _, _ = policy.score(
        frames[part], prompts[part], answers[part], [[1.0] * len(a) for a in answers[part]]
    )
    (-(advantages[part] * logprob).mean()).backward()
    params = [p for p in policy.parameters() if p.requires_grad]
    parallel.average_gradients(params)
    torch.save([p.grad for p in params], os.path.join(out, f"grads{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_a_flat_worker_leaves_the_others_explained_variance_in_the_row(monkeypatch):
    """torchrun: a worker whose returns hardly varied logs NaN; the row keeps the others' mean."""

    def two_workers(obj):  # this worker's figures, and a second worker's
        if isinstance(obj, dict):
            return [obj, dict(obj, explained_var=0.5, pg_loss=0.3)]
        return [obj, obj]

    monkeypatch.setattr(report, "gather", two_workers)
    args = SimpleNamespace(batch_size=4)
    data = dict(format_error_rate=0.25, readout_acc=1.0, gallery=[])
    for mine, expected in ((float("nan"), 0.5), (0.1, 0.3)):
        stats = dict(explained_var=mine, pg_loss=0.1)
        row = report.update_row(args, 1, 1e-4, [(1.0, 3)], data, stats, 0.0)
        assert row["explained_var"] == pytest.approx(expected)
        assert row["pg_loss"] == pytest.approx(0.2) and row["format_error_rate"] == 0.25
    monkeypatch.setattr(report, "gather", lambda obj: [obj, obj])  # every worker flat: NaN
    row = report.update_row(args, 1, 1e-4, [], data, dict(explained_var=float("nan")), 0.0)
    assert np.isnan(row["explained_var"]) and np.isnan(row["success"])


def union_minibatch(policy):
    env = NumberLine()
    states = [env.reset(seed=s) for s in range(4)]
    ids = [
        policy.processor.tokenizer(f'{{"action": "{a}"}}', add_special_tokens=False).input_ids
        for a in "+-+-"
    ]
    return (
        [o for o, _ in states],
        prompts_of(policy, "numberline", [i for _, i in states]),
        ids,
        torch.tensor([1.0, -0.5, 2.0, 0.25]),
    )


def test_averaged_gradient_of_two_workers_equals_the_union_gradient(tiny, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(averaged_gradient_worker, args=(tiny[0], port, str(tmp_path)), nprocs=2)
    policy = fresh_policy(tiny)
    frames, prompts, answers, advantages = union_minibatch(policy)
    logprob, _, _, _ = policy.score(frames, prompts, answers, [[1.0] * len(a) for a in answers])
    (-(advantages * logprob).mean()).backward()
    union = [
        torch.zeros_like(p) if p.grad is None else p.grad
        for p in policy.parameters()
        if p.requires_grad
    ]
    worker0, worker1 = (torch.load(tmp_path / f"grads{r}.pt") for r in (0, 1))
    assert all(
        torch.equal(a, b) for a, b in zip(worker0, worker1)
    )  # every worker holds the same mean
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(worker0, union))


def test_torchrun_two_workers_keep_identical_weights_and_resume(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        os.path.join(HERE, "rl4vlm_min.py"),
    ]
    for extra in (
        ["--total-steps", "32"],
        ["--resume", str(out), "--total-steps", "64"],
    ):  # 1 update, then 1 more
        # LoRA here (the resume test above trains all weights), so that resuming a LoRA run is tested too
        proc = subprocess.run(
            [*torchrun, *TINY_RUN, "--lora-rank", "8", "--output-dir", str(out), *extra],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
            cwd=HERE,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        "resumed" in proc.stdout
        and proc.stdout.count("update   2/2") == 1
        and "2 workers" in proc.stdout
    )  # rank 0 prints
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["env_steps"] for r in rows] == [32, 64]  # --total-steps counts both workers' steps
    assert all(len(r["weight_digests"]) == 2 and len(set(r["weight_digests"])) == 1 for r in rows)
    assert sorted(p.name for p in out.iterdir()) == [
        "before_rl.json",
        "checkpoint",
        "final_model",
        "learning_curve.png",
        "metrics.jsonl",
        "sft_model",
        "summary.json",
    ]  # the tiny model itself is tiny-llava/, not in the run
    single = run_cli(
        "--resume", str(out), timeout=300
    )  # resuming with another worker count is refused
    assert single.returncode == 2 and "written by 2 worker(s)" in single.stderr, single.stderr


def test_text_only_model_is_refused(tmp_path):
    import transformers

    transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**tiny_families.TEXT, vocab_size=320)
    ).save_pretrained(tmp_path / "text")
    tiny_families._tokenizer([], eos="</s>", pad="<pad>", bos="<s>").save_pretrained(
        tmp_path / "text"
    )
    proc = run_cli(
        "--model", str(tmp_path / "text"), "--output-dir", str(tmp_path / "run"), timeout=120
    )
    assert (
        proc.returncode == 2
        and "cannot load --model" in proc.stderr
        and "image-text-to-text" in proc.stderr
    )


# ---- THE BENCHMARK SCRIPT: its --quick mode, so that it cannot rot ----
def test_bench_quick_writes_the_report(tmp_path):
    from benchmark import bench

    bench.main(["--quick", "--out", str(tmp_path)])
    report = (tmp_path / "RESULTS.md").read_text()
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert "| numberline |" in report and "| no CoT |" in report and "| lambda 1 |" in report
    assert "| thoughts: the state only |" in report
    assert "| thoughts: the state, then a plan |" not in report  # NumberLine's default: no row
    assert "One default NumberLine update (4 envs x 4 steps, 1 epoch(s) of minibatch 32)" in report
    assert [bench.default_thoughts(t) for t in bench.TASKS] == ["plan", "state", "plan", "plan"]
    rates = [
        float(line.split("|")[2])
        for line in report.splitlines()
        if line.startswith("| rollout,")
        or line.startswith("| training,")
        or line.startswith("| PPO update,")
    ]
    assert len(rates) == 7 and all(r > 0 for r in rates)
    # the ablations' report alone (no main-table game): no curves, no speed, and no traceback
    (tmp_path / "curves.png").unlink()
    only = ["--tasks", "--numberline-ablation-seeds", "1", "--ezpoints-ablation-seeds"]
    bench.main(["--report-only", "--quick", "--out", str(tmp_path), *only])
    report = (tmp_path / "RESULTS.md").read_text()
    assert "| no CoT |" in report and "| numberline |" not in report and "curves.png" not in report
    assert "No main table" in report and "| task | seed |" not in report
    assert "Speed: not measured: it needs the main table's NumberLine run of seed 1." in report
    assert not (tmp_path / "curves.png").exists()  # not drawn (the one of the first call removed)
    with pytest.raises(SystemExit, match="no finished run under"):  # nothing trained: one line
        bench.main(["--report-only", "--out", str(tmp_path / "empty")])
    # a finished run is reused by name: one trained with other settings is refused, not reported
    meta_path = tmp_path / "runs" / "numberline-seed1" / "checkpoint" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["args"]["adv_norm"] = "rollout"  # as if made when this was NumberLine's default
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(SystemExit, match="trained with adv_norm 'rollout' .today: 'minibatch'."):
        bench.main(["--report-only", "--quick", "--out", str(tmp_path)])
    # a field only one side has (added or removed since) is not a difference
    del meta["args"]["adv_norm"]
    meta["args"]["a_removed_flag"] = 1
    meta_path.write_text(json.dumps(meta))
    (tmp_path / "RESULTS.md").unlink()
    bench.main(["--report-only", "--quick", "--no-speed", "--out", str(tmp_path)])
    assert "| numberline |" in (tmp_path / "RESULTS.md").read_text()


# ---- LOWER PRECISION: what a bf16 GPU run meets, shown on the CPU in bf16 ----
def tiny_in(tiny, dtype, lora_rank=0):
    """The tiny model in `dtype` as RL starts: (policy, args), LoRA added if lora_rank > 0."""
    processor, vlm = R.load_model(tiny[0], torch.device("cpu"), dtype)
    torch.manual_seed(0)
    policy = R.Policy(vlm, processor, 1.0, 0.5)
    args = R.parse_args(["--lora-rank", str(lora_rank), "--kl-coef", "0"])
    params = R.set_trainable(policy, args, "rl")
    return policy, args, params


def fixed_batch(policy, n=4):
    """n NumberLine states and a well-formed answer for each: frames, prompts, answers, weights."""
    states = [NumberLine().reset(seed=s) for s in range(n)]
    texts = [R.answer_text("numberline", info, "+", True) for _, info in states]
    tok = policy.processor.tokenizer
    answers = [tok(t, add_special_tokens=False).input_ids + [tok.eos_token_id] for t in texts]
    prompts = prompts_of(policy, "numberline", [i for _, i in states])
    return [o for o, _ in states], prompts, answers, [policy.token_weights(a) for a in answers]


def sft_steps(policy, optimizer, params, batch, n):
    """n optimizer steps raising the log-prob of the fixed batch's answers."""
    policy.train()
    for _ in range(n):
        optimizer.zero_grad()
        (-policy.score(*batch)[0].mean()).backward()
        optimizer.step()


def test_bf16_weights_learn_at_lr_1e5_through_fp32_copies(tiny):
    """bf16 keeps 8 significant bits: Adam's step of about lr = 1e-5 per weight is below half a
    bf16 step for all but the smallest weights, so torch's Adam on bf16 weights leaves most of
    them as they were after 30 steps. parallel.Adam steps fp32 copies and writes them back rounded: the small
    steps add up, most bf16 weights change, and the fp32 copies moved about 30 x 1e-5."""
    changed = {}
    for name, make in (("torch", torch.optim.Adam), ("fp32 copies", parallel.Adam)):
        policy, _, params = tiny_in(tiny, torch.bfloat16)
        vlm_params = [p for p in params if p.dtype == torch.bfloat16]
        before = [p.detach().clone() for p in vlm_params]
        optimizer = make(params, lr=1e-5)
        sft_steps(policy, optimizer, params, fixed_batch(policy), 30)
        moved = sum((p != b).sum().item() for p, b in zip(vlm_params, before))
        changed[name] = moved / sum(p.numel() for p in vlm_params)
        if name == "fp32 copies":
            pairs = optimizer.copies()
            assert len(pairs) == len(vlm_params) and all(m.dtype == torch.float32 for _, m in pairs)
            shift = torch.cat([(m - b.float()).abs().flatten() for (_, m), b in zip(pairs, before)])
            assert 1e-4 < shift.median().item() < 4e-4, shift.median()
    assert changed["torch"] < 0.3 and changed["fp32 copies"] > 0.8, changed  # 0.14 and 0.89


def test_bf16_fp32_copies_resume_exactly(tiny):
    """--resume in bf16: the optimizer's state holds the fp32 copies, so an optimizer restored from
    it takes the very next step the uninterrupted one takes (bf16 weights alone would lose them).
    As --resume does it: the optimizer is built first, then the weights and its state are loaded.
    A state without copies (a checkpoint written in fp32) starts them from the restored weights."""
    import copy

    policy, _, params = tiny_in(tiny, torch.bfloat16)
    batch = fixed_batch(policy)
    optimizer = parallel.Adam(params, lr=1e-4)
    sft_steps(policy, optimizer, params, batch, 3)
    saved_weights = {n: t.clone() for n, t in parallel.trainable_state(policy).items()}
    saved_state = copy.deepcopy(optimizer.state_dict())  # as written to disk: not live tensors
    sft_steps(policy, optimizer, params, batch, 2)
    expected = parallel.weights_digest(policy)
    for state in (saved_state, {k: v for k, v in saved_state.items() if k != "masters"}):
        resumed, _, params2 = tiny_in(tiny, torch.bfloat16)
        optimizer2 = parallel.Adam(params2, lr=1e-4)  # start_rl, then restore_checkpoint
        resumed.load_state_dict(saved_weights, strict=False)
        optimizer2.load_state_dict(state)
        now = parallel.trainable_state(resumed)
        assert all(torch.equal(now[n], saved_weights[n]) for n in saved_weights)  # not clobbered
        copies = [m for _, m in optimizer2.copies()]
        if "masters" in state:  # the saved copies, and the very next steps
            assert all(torch.equal(m, saved) for m, saved in zip(copies, state["masters"]))
            sft_steps(resumed, optimizer2, params2, batch, 2)
            assert parallel.weights_digest(resumed) == expected
        else:  # copies from the restored weights, not the weights before the restore
            assert all(torch.equal(m, w.float()) for w, m in optimizer2.copies())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("lora_rank", [0, 4])
def test_final_model_scores_as_the_evaluated_policy(tiny, tmp_path, dtype, lora_rank):
    """final_model, loaded back with --model in the run's dtype, scores a fixed batch of answers as
    the trained policy did just before saving (within the dtype's rounding), value head included.
    LoRA over bf16 weights is merged in fp32 and saved in fp32: adapters whose changes lie below
    bf16's resolution survive the merge (merged in bf16 they rounded away)."""
    policy, _, params = tiny_in(tiny, dtype, lora_rank)
    batch = fixed_batch(policy)
    sft_steps(policy, parallel.Adam(params, lr=1e-3), params, batch, 3)
    if lora_rank:  # one adapter's change made 1e-3 of its weights: below bf16's half-step
        layer = next(m for m in policy.vlm.modules() if isinstance(m, R.LoRALinear))
        with torch.no_grad():
            layer.lora_B.zero_()
            layer.lora_B[:, 0] = 1e-3 * layer.base.weight.abs().mean().item() / layer.scale
            layer.lora_A.fill_(1.0)
        base_weight, delta = (
            layer.base.weight.detach().float().clone(),
            layer.scale * (layer.lora_B @ layer.lora_A).detach(),
        )
    policy.eval()
    with torch.no_grad():
        logprob, value, _, _ = policy.score(*batch)
    path = str(tmp_path / "final_model")
    checkpoints.save_final_model(policy, path)
    processor, vlm = R.load_model(path, torch.device("cpu"), dtype)
    reloaded = R.Policy(vlm, processor, 1.0, 0.5)
    from safetensors.torch import load_file

    reloaded.value_head.load_state_dict(load_file(os.path.join(path, "value_head.safetensors")))
    with torch.no_grad():
        logprob2, value2, _, _ = reloaded.eval().score(*batch)
    tolerance = 1e-4 if dtype == torch.float32 else 0.05  # per answer of ~20 tokens
    assert (logprob2 - logprob).abs().max() < tolerance, (logprob, logprob2)
    assert (value2 - value).abs().max() < tolerance, (value, value2)
    if lora_rank:
        config = json.loads(open(os.path.join(path, "config.json")).read())
        assert config["dtype"] == config["text_config"]["dtype"] == "float32"
        weights = load_file(os.path.join(path, "model.safetensors"))
        saved = next(w for n, w in weights.items() if w.shape == base_weight.shape and
                     torch.allclose(w, base_weight + delta, atol=1e-7))  # fmt: skip
        assert (saved - base_weight).abs().max() > 0  # the sub-bf16 change is in the saved model


@pytest.mark.parametrize("grad_clip", ["apart"])  # joint: the paper-preset test, in fp32
def test_a_bf16_run_trains_on_policy_and_saves(tmp_path, grad_clip):
    """The whole loop in bf16 (SFT, rollout, PPO with a bf16 VLM and an fp32 value head, the
    final model): every update's first ratio is exactly 1, and the VLM's weights moved."""
    out = tmp_path / "run"
    R.main([*TINY_RUN, "--dtype", "bfloat16", "--grad-clip", grad_clip, "--output-dir", str(out)])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["first_ratio_dev"] == 0 for r in rows)
    assert json.loads((out / "final_model" / "config.json").read_text())["dtype"] == "bfloat16"


def weights_check_worker(rank, path, port, out):
    """A torchrun worker in bf16 with every weight trainable: one averaged step, then the weights
    check that every update runs (parallel.check_weights_agree)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    parallel.WORLD, parallel.RANK = 2, rank
    policy, _, params = tiny_in((path,), torch.bfloat16)
    frames, prompts, answers, weights = fixed_batch(policy)
    optimizer = parallel.Adam(params, lr=1e-3)
    part = slice(2 * rank, 2 * rank + 2)  # each worker its half of the batch
    (-policy.score(frames[part], prompts[part], answers[part], weights[part])[0].mean()).backward()
    parallel.average_gradients(params)
    optimizer.step()
    row = {"update": 1}
    parallel.check_weights_agree(policy, row)
    json.dump(row["weight_digests"], open(os.path.join(out, f"digests{rank}.json"), "w"))
    torch.distributed.destroy_process_group()


def test_torchrun_weights_check_works_in_bf16_with_every_weight_trained(tiny, tmp_path):
    """2 gloo workers, bf16, --lora-rank 0: the digest reads any dtype's bytes (numpy has no bf16,
    and .numpy() on a bf16 tensor raised after the first update), and the workers agree."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(weights_check_worker, args=(tiny[0], port, str(tmp_path)), nprocs=2)
    digests = [json.loads((tmp_path / f"digests{r}.json").read_text()) for r in (0, 1)]
    assert digests[0] == digests[1] and len(set(digests[0])) == 1 and len(digests[0][0]) == 40


# ---- ONE SCORING FUNCTION: the forward's logit transform, and every dropout off ----
def tiny_paligemma(path, cap):
    """A tiny random PaliGemma (SigLIP + Gemma 2) whose forward soft-caps its logits at `cap`."""
    tok = tiny_families._tokenizer(["<image>"], bos="<bos>", eos="<eos>", pad="<pad>")
    vision = transformers.SiglipVisionConfig(**tiny_families.VISION, image_size=28, patch_size=14)
    ids = tiny_families._ids(tok, bos="<bos>", eos="<eos>", pad="<pad>")
    text = transformers.Gemma2Config(**tiny_families.TEXT, **ids, final_logit_softcapping=cap)
    config = transformers.PaliGemmaConfig(
        vision_config=vision, text_config=text, projection_dim=tiny_families.TEXT["hidden_size"],
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.PaliGemmaForConditionalGeneration(config)
    image_processor = transformers.SiglipImageProcessor(size={"height": 28, "width": 28})
    image_processor.image_seq_length = 4
    processor = transformers.PaliGemmaProcessor(
        image_processor=image_processor, tokenizer=tok, chat_template=tiny_families.LLAVA_TEMPLATE
    )
    return tiny_families._finish(model.eval(), processor, path)


def test_score_applies_the_logit_softcap_of_the_models_forward(tmp_path, monkeypatch, capsys):
    """A checkpoint whose forward soft-caps its logits (cap * tanh(logits / cap)): score() scores an
    answer exactly as the model's own forward (which generate() samples from) does; with the bare
    output layer the log-probs differ. A forward doing anything else is refused with one line."""
    path = tiny_paligemma(str(tmp_path / "paligemma"), cap=0.3)
    processor, vlm = R.load_model(path, torch.device("cpu"), torch.float32)
    policy = R.Policy(vlm, processor, 1.0, 0.5)
    checks.check_scoring(policy)
    assert "soft-cap" in capsys.readouterr().out
    frames, prompts, answers, weights = fixed_batch(policy, n=1)  # (no padding to mirror below)
    ones = [[1.0] * len(a) for a in answers]
    with torch.no_grad():
        logprob = policy.eval().score(frames, prompts, answers, ones)[0]
        batch = policy.encode_prompts(frames, prompts)
        P = batch["input_ids"].shape[1]
        ids = torch.cat([batch.pop("input_ids"), torch.tensor(answers)], 1)
        mask = torch.cat([batch.pop("attention_mask"), torch.ones_like(torch.tensor(answers))], 1)
        batch.pop("labels", None)  # PaliGemma's processor adds labels: no loss here
        if "token_type_ids" in batch:
            batch["token_type_ids"] = torch.cat(
                [batch["token_type_ids"], 0 * torch.tensor(answers)], 1
            )
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        own = vlm(input_ids=ids, attention_mask=mask, position_ids=positions, **batch).logits
        own = own[:, P - 1 : -1].float()
        own[..., policy.banned] = -torch.inf  # generate() never samples these either
        own = own.log_softmax(-1)
        own = own.gather(-1, ids[:, P:, None])[..., 0].sum(-1)
    assert torch.allclose(logprob, own, atol=1e-4), (logprob, own)
    vlm.logit_transform = None  # the bare output layer: another distribution
    with torch.no_grad():
        bare = policy.score(frames, prompts, answers, ones)[0]
    assert (bare - own).abs().max() > 0.1
    forward = type(vlm).forward  # a forward that doubles its logits: no known transform

    def doubled(self, *a, **k):
        out = forward(self, *a, **k)
        out.logits = 2 * out.logits
        return out

    monkeypatch.setattr(type(vlm), "forward", doubled)
    with pytest.raises(SystemExit) as exit_info:
        checks.check_scoring(policy)
    assert exit_info.value.code == 2 and "transforms its logits" in capsys.readouterr().err


def test_every_dropout_is_off_in_rl_with_a_clip_tower_attention_dropout(tmp_path, monkeypatch):
    """A LLaVA whose CLIP tower keeps attention dropout 0.1 in a float named `dropout` (used in
    train mode only): RL zeroes it, so the first minibatch's ratio is 1; with only nn.Dropout
    modules and `attention_dropout` fields zeroed (the old rule) the ratio drifts from 1. A model
    that still computes differently in train mode is refused before RL starts."""
    path = tiny_families.build_tiny_checkpoint("llava", str(tmp_path / "llava"))
    config = json.loads(open(os.path.join(path, "config.json")).read())
    config["vision_config"]["attention_dropout"] = 0.1
    json.dump(config, open(os.path.join(path, "config.json"), "w"))
    args = [*TINY_RUN, "--model", path, "--sft-steps", "0", "--total-steps", "16"]
    R.main([*args, "--output-dir", str(tmp_path / "run")])
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["first_ratio_dev"] < 1e-5, row["first_ratio_dev"]

    def old_rule(policy):
        for m in policy.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
            if isinstance(getattr(m, "attention_dropout", None), float):
                m.attention_dropout = 0.0

    processor, vlm = R.load_model(path, torch.device("cpu"), torch.float32)
    policy = R.Policy(vlm, processor, 1.0, 0.5)
    old_rule(policy)
    frames, prompts, answers, weights = fixed_batch(policy, n=2)
    with torch.no_grad():
        train = policy.train().score(frames, prompts, answers, weights)[0]
        evaluated = policy.eval().score(frames, prompts, answers, weights)[0]
    assert (train - evaluated).abs().max() > 1e-3  # the CLIP float still drops attention
    checks.dropout_off(policy)
    with torch.no_grad():
        train = policy.train().score(frames, prompts, answers, weights)[0]
    assert torch.equal(train, evaluated)
    drop = lambda module, inputs, out: torch.nn.functional.dropout(out, 0.1, module.training)
    vlm.model.multi_modal_projector.register_forward_hook(drop)  # a dropout with no name at all
    with pytest.raises(SystemExit) as exit_info:
        checks.dropout_off(policy)
    assert exit_info.value.code == 2


def test_resume_refuses_a_checkpoint_written_with_other_settings(tmp_path, capsys):
    """A checkpoint from an older rl4vlm_min.py: a setting it lacks (here --vf-clip) would take
    today's default and change the run; one it has that is gone would be dropped. Both refused."""
    import dataclasses

    saved = dataclasses.asdict(R.parse_args([]))
    for change in ({"vf_clip": None}, {"pretrain_steps": 3000}):
        args = {k: v for k, v in {**saved, **change}.items() if v is not None}
        (tmp_path / "checkpoint").mkdir(exist_ok=True)
        (tmp_path / "checkpoint" / "meta.json").write_text(json.dumps({"args": args}))
        with pytest.raises(SystemExit) as stop:
            R.parse_args(["--resume", str(tmp_path)])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and "start a new run" in err and list(change)[0] in err, err
