"""REINFORCE written entirely in Numba, calling ``fastrms.rmsprop_update`` every step.

Two problems, each a tiny policy trained by the policy gradient with RMSProp (``maximize=True``:
the gradient is of the expected reward):

- ``bandit``: a contextual bandit, 4 context features and 4 arms, a linear softmax policy (20
  parameters). Each step draws one context, samples an arm, and updates: almost no arithmetic,
  so a step costs what calling the optimizer costs.
- ``cartpole``: the classic cart-pole (the equations of Barto, Sutton and Anderson, 1983, as
  gym's CartPole-v1 has them, episodes of at most 200 steps), a 4-16-2 tanh policy (114
  parameters); one step is one episode and one update.

``train(problem, theta, square_avg, rng_state, steps)`` is one function, compiled by Numba
(``compiled_loop``) or run by Python calling the compiled environment and gradient and then
``fastrms.rmsprop_update`` from Python (``python_loop``): the same source, the same random
numbers (an explicit xorshift state), so the two give identical parameters. bench/
bench_embedding.py times them side by side; tests/test_embedding_example.py checks that they
agree.
"""
from __future__ import annotations

import math

import numba
import numpy as np

import fastrms
from fastrms import backends

backends.load("numba")  # registers rmsprop_update for @njit code, as Numba's entry point does

LR = 0.01
ALPHA = 0.99
CONTEXTS, ARMS = 4, 4
OBSERVATIONS, HIDDEN, ACTIONS = 4, 16, 2
MAX_STEPS = 200
GAMMA = 0.99
SIZES = {"bandit": ARMS * CONTEXTS + ARMS,
         "cartpole": HIDDEN * OBSERVATIONS + HIDDEN + ACTIONS * HIDDEN + ACTIONS}


# -- random numbers: xorshift64*, state in a uint64 array so both loops share one stream --------

@numba.njit
def uniform(state) -> float:
    x = state[0]
    x ^= x >> np.uint64(12)
    x ^= x << np.uint64(25)
    x ^= x >> np.uint64(27)
    state[0] = x
    return float((x * np.uint64(2685821657736338717)) >> np.uint64(11)) * 2.0 ** -53


@numba.njit
def sample(probabilities, state) -> int:
    u = uniform(state)
    total = 0.0
    for k in range(probabilities.size - 1):
        total += probabilities[k]
        if u < total:
            return k
    return probabilities.size - 1


@numba.njit
def softmax(logits, out):
    top = logits.max()
    for k in range(logits.size):
        out[k] = math.exp(logits[k] - top)
    out /= out.sum()


# -- the contextual bandit ----------------------------------------------------------------------

#: Mean reward of arm k in context x: x @ TRUE_WEIGHTS[:, k].
TRUE_WEIGHTS = np.array([[1.0, -1.0, 0.5, 0.0], [0.0, 1.0, -0.5, 0.5],
                         [-1.0, 0.0, 1.0, -0.5], [0.5, 0.5, 0.0, 1.0]])


@numba.njit
def bandit_gradient(theta, grad, rng_state, baseline):
    """One interaction: grad of log pi(a|x) * (r - baseline), for a linear softmax policy.
    Returns the reward."""
    x = np.empty(CONTEXTS)
    for i in range(CONTEXTS):
        x[i] = 2.0 * uniform(rng_state) - 1.0
    weights = theta[:ARMS * CONTEXTS].reshape(ARMS, CONTEXTS)
    logits = np.empty(ARMS)
    for k in range(ARMS):
        logits[k] = theta[ARMS * CONTEXTS + k]
        for i in range(CONTEXTS):
            logits[k] += weights[k, i] * x[i]
    pi = np.empty(ARMS)
    softmax(logits, pi)
    action = sample(pi, rng_state)
    reward = 0.0
    for i in range(CONTEXTS):
        reward += x[i] * TRUE_WEIGHTS[i, action]
    reward += 0.1 * (2.0 * uniform(rng_state) - 1.0)
    advantage = reward - baseline
    for k in range(ARMS):
        score = (1.0 if k == action else 0.0) - pi[k]
        for i in range(CONTEXTS):
            grad[k * CONTEXTS + i] = advantage * score * x[i]
        grad[ARMS * CONTEXTS + k] = advantage * score
    return reward


# -- cart-pole ------------------------------------------------------------------------------------

@numba.njit
def cartpole_step(s, action):
    """One 0.02 s Euler step; returns True when the episode ends (pole or cart out of range)."""
    x, x_dot, theta, theta_dot = s[0], s[1], s[2], s[3]
    force = 10.0 if action == 1 else -10.0
    cos, sin = math.cos(theta), math.sin(theta)
    total_mass, pole_mass_length, half_length = 1.1, 0.05, 0.5
    temp = (force + pole_mass_length * theta_dot * theta_dot * sin) / total_mass
    theta_acc = (9.8 * sin - cos * temp) / (half_length * (4.0 / 3.0 - 0.1 * cos * cos / total_mass))
    x_acc = temp - pole_mass_length * theta_acc * cos / total_mass
    s[0] = x + 0.02 * x_dot
    s[1] = x_dot + 0.02 * x_acc
    s[2] = theta + 0.02 * theta_dot
    s[3] = theta_dot + 0.02 * theta_acc
    return abs(s[0]) > 2.4 or abs(s[2]) > 12 * math.pi / 180


@numba.njit
def cartpole_gradient(theta, grad, rng_state, baseline):
    """One episode: grad of sum_t log pi(a_t|s_t) * (G_t - mean G), for a 4-16-2 tanh policy.
    Returns the episode's length (its undiscounted return)."""
    n1 = HIDDEN * OBSERVATIONS
    w1 = theta[:n1].reshape(HIDDEN, OBSERVATIONS)
    b1 = theta[n1:n1 + HIDDEN]
    w2 = theta[n1 + HIDDEN:n1 + HIDDEN + ACTIONS * HIDDEN].reshape(ACTIONS, HIDDEN)
    b2 = theta[n1 + HIDDEN + ACTIONS * HIDDEN:]
    states = np.empty((MAX_STEPS, OBSERVATIONS))
    hiddens = np.empty((MAX_STEPS, HIDDEN))
    scores = np.empty((MAX_STEPS, ACTIONS))  # d log pi(a) / d logits
    s = np.empty(OBSERVATIONS)
    for i in range(OBSERVATIONS):
        s[i] = 0.1 * uniform(rng_state) - 0.05
    pi = np.empty(ACTIONS)
    logits = np.empty(ACTIONS)
    length = 0
    for t in range(MAX_STEPS):
        states[t] = s
        for j in range(HIDDEN):
            z = b1[j]
            for i in range(OBSERVATIONS):
                z += w1[j, i] * s[i]
            hiddens[t, j] = math.tanh(z)
        for k in range(ACTIONS):
            z = b2[k]
            for j in range(HIDDEN):
                z += w2[k, j] * hiddens[t, j]
            logits[k] = z
        softmax(logits, pi)
        action = sample(pi, rng_state)
        for k in range(ACTIONS):
            scores[t, k] = (1.0 if k == action else 0.0) - pi[k]
        length = t + 1
        if cartpole_step(s, action):
            break
    returns = np.empty(length)
    running = 0.0
    for t in range(length - 1, -1, -1):
        running = 1.0 + GAMMA * running
        returns[t] = running
    mean = returns.mean()
    grad[:] = 0.0
    g1 = grad[:n1].reshape(HIDDEN, OBSERVATIONS)
    gb1 = grad[n1:n1 + HIDDEN]
    g2 = grad[n1 + HIDDEN:n1 + HIDDEN + ACTIONS * HIDDEN].reshape(ACTIONS, HIDDEN)
    gb2 = grad[n1 + HIDDEN + ACTIONS * HIDDEN:]
    for t in range(length):
        advantage = (returns[t] - mean) / MAX_STEPS
        for k in range(ACTIONS):
            d = advantage * scores[t, k]
            gb2[k] += d
            for j in range(HIDDEN):
                g2[k, j] += d * hiddens[t, j]
        for j in range(HIDDEN):
            back = 0.0
            for k in range(ACTIONS):
                back += w2[k, j] * scores[t, k]
            d = advantage * back * (1.0 - hiddens[t, j] ** 2)
            gb1[j] += d
            for i in range(OBSERVATIONS):
                g1[j, i] += d * states[t, i]
    return float(length)


GRADIENTS = {"bandit": bandit_gradient, "cartpole": cartpole_gradient}


# -- the training loop: one source, compiled or run by Python ---------------------------------

def _make_train(gradient):
    def train(theta, square_avg, rng_state, steps):
        """``steps`` policy-gradient steps; returns the mean reward (bandit) or episode
        length (cart-pole)."""
        grad = np.empty_like(theta)
        total = 0.0
        baseline = 0.0
        for _ in range(steps):
            reward = gradient(theta, grad, rng_state, baseline)
            baseline = 0.99 * baseline + 0.01 * reward
            total += reward
            fastrms.rmsprop_update(theta, grad, square_avg, lr=LR, alpha=ALPHA, maximize=True)
        return total / max(steps, 1)
    return train


python_loop = {name: _make_train(gradient) for name, gradient in GRADIENTS.items()}
compiled_loop = {name: numba.njit(_make_train(gradient)) for name, gradient in GRADIENTS.items()}


def initial_state(problem: str, seed: int = 0):
    """(theta, square_avg, rng_state): float32 parameters, small random weights."""
    rng = np.random.default_rng(seed)
    theta = (0.1 * rng.standard_normal(SIZES[problem])).astype(np.float32)
    return theta, np.zeros_like(theta), np.array([0x9E3779B97F4A7C15 + seed], np.uint64)
