import pytest
import torch

from llmstack.rl.advantages import RunningMoments, gae, last_token_index, token_rewards, whiten
from llmstack.rl.kl import AdaptiveKLController, kl_k1, kl_k2, kl_k3


def gae_closed_form(rewards, values, length, gamma, lam):
    """A_t = sum_l (gamma lam)^l delta_{t+l}, written as the explicit double sum."""
    deltas = [rewards[t] + gamma * (values[t + 1] if t + 1 < length else 0.0) - values[t] for t in range(length)]
    return [sum((gamma * lam) ** (l - t) * deltas[l] for l in range(t, length)) for t in range(length)]


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.5), (0.99, 1.0)])
def test_gae_matches_the_closed_form_sum_and_ignores_padding(gamma, lam):
    rewards = torch.tensor([[0.1, -0.2, 0.0, 1.5, 9.0], [0.3, 2.0, 7.0, 7.0, 7.0]])
    values = torch.tensor([[0.5, 0.4, -0.1, 0.2, 5.0], [1.0, -1.0, 3.0, 3.0, 3.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    for row, length in ((0, 4), (1, 2)):
        expected = gae_closed_form(rewards[row].tolist(), values[row].tolist(), length, gamma, lam)
        assert advantages[row, :length].tolist() == pytest.approx(expected, rel=1e-5)
        assert advantages[row, length:].abs().sum() == 0
        assert returns[row, :length].tolist() == pytest.approx(
            [a + v for a, v in zip(expected, values[row].tolist())], rel=1e-5)


def test_whitening_uses_valid_tokens_only():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, -50.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    white = whiten(x, mask)
    valid = white[mask.bool()]
    assert valid.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert valid.std().item() == pytest.approx(1.0, rel=1e-4)
    expected = (torch.tensor([1.0, 2, 3, 4, 5]) - 3) / torch.tensor([1.0, 2, 3, 4, 5]).std()
    assert valid.tolist() == pytest.approx(expected.tolist(), rel=1e-4)
    assert white[~mask.bool()].abs().sum() == 0


def test_whitening_statistics_come_from_the_all_reduced_sums():
    x, mask = torch.tensor([[1.0, 3.0]]), torch.tensor([[1, 1]])
    # a second process holding [5, 7]: the reduce adds its sums (12, 74, 2)
    other = torch.tensor([12.0, 74.0, 2.0])
    white = whiten(x, mask, all_reduce_sum=lambda s: s + other)
    global_std = torch.tensor([1.0, 3, 5, 7]).std()
    assert white[0].tolist() == pytest.approx(((torch.tensor([1.0, 3.0]) - 4) / global_std).tolist(), rel=1e-4)


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -2.0, -0.2])
    r = ref - logp  # [-0.5, 0, 0.3]
    assert kl_k1(logp, ref).tolist() == pytest.approx([0.5, 0.0, -0.3])
    assert kl_k2(logp, ref).tolist() == pytest.approx([0.125, 0.0, 0.045])
    assert kl_k3(logp, ref).tolist() == pytest.approx([(torch.exp(v) - 1 - v).item() for v in r], rel=1e-5)
    assert (kl_k3(logp, ref) >= 0).all()


def test_adaptive_controller_follows_ziegler_et_al():
    ctl = AdaptiveKLController(init_coef=0.2, target=6.0, horizon=10000)
    ctl.update(observed_kl=9.0, n_steps=256)  # error clipped at +0.2
    assert ctl.coef == pytest.approx(0.2 * (1 + 0.2 * 256 / 10000))
    ctl.update(observed_kl=5.4, n_steps=100)  # error -0.1
    assert ctl.coef == pytest.approx(0.2 * (1 + 0.2 * 256 / 10000) * (1 - 0.1 * 100 / 10000))


def test_score_lands_on_the_last_real_token():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 0, 3]
    rewards = token_rewards(torch.tensor([1.0, 2.0, 3.0]), torch.ones(3, 4), mask, kl_coef=0.1)
    expected = torch.tensor([[-0.1, -0.1, 0.9, 0.0], [1.9, 0, 0, 0], [-0.1, -0.1, -0.1, 2.9]])
    torch.testing.assert_close(rewards, expected)


def test_running_moments_match_a_direct_computation():
    moments, chunks = RunningMoments(), [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0]), torch.tensor([-4.0, 0.5])]
    for chunk in chunks:
        moments.update(chunk)
    everything = torch.cat(chunks)
    assert moments.mean == pytest.approx(everything.mean().item())
    assert moments.std == pytest.approx(everything.std().item())
