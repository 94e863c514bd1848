"""group_advantages: the torch reference against TRL's recipe written out, the Triton kernel against the reference."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_paged_attention import DEVICE, max_rel_err

from kernels.advantages import REWARD_COLUMNS, group_advantages, group_advantages_reference

SCALES = ["group", "batch", "none"]
COMBINES = ["product", "sum", 2]


def rewards_case(groups, n, k=4, seed=0):
    """Rewards on a 1e-3 grid, so group spreads are either 0 or far above rounding noise."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 1001, (groups * n, k), generator=g).float() / 1000).to(DEVICE)


def trl_advantages(r, n, scale):
    """TRL GRPOTrainer's recipe verbatim in spirit: group mean, torch.std (unbiased), eps 1e-4."""
    mean = r.view(-1, n).mean(1).repeat_interleave(n)
    if scale == "group":
        return (r - mean) / (r.view(-1, n).std(1).repeat_interleave(n) + 1e-4)
    if scale == "batch":
        return (r - mean) / (r.std() + 1e-4)
    return r - mean


def test_reward_columns_and_product_order():
    assert REWARD_COLUMNS == ("R_PI", "R_sem", "R_spa", "R_RI")
    r = torch.tensor([[0.5, 0.2, 0.3, 0.8], [1.0, 0.1, 0.1, 0.5]], device=DEVICE)
    for fn in (group_advantages, group_advantages_reference):
        out = fn(r, 2, scale_rewards="none")
        torch.testing.assert_close(out.combined_rewards.cpu(), torch.tensor([0.5 * 0.5 * 0.8, 1.0 * 0.2 * 0.5]))
        torch.testing.assert_close(out.advantages.cpu(), torch.tensor([0.05, -0.05]))


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("combine", COMBINES)
def test_reference_matches_trl(combine, scale):
    rewards = rewards_case(4, 8)
    out = group_advantages_reference(rewards, 8, combine=combine, scale_rewards=scale)
    if combine == "product":
        r = rewards[:, 0] * (rewards[:, 1] + rewards[:, 2]) * rewards[:, 3]
    else:
        r = rewards.sum(1) if combine == "sum" else rewards[:, combine]
    assert max_rel_err(out.advantages, trl_advantages(r, 8, scale)) < 1e-6
    torch.testing.assert_close(out.group_std, r.view(-1, 8).std(1))


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("combine", COMBINES)
@pytest.mark.parametrize("groups,n", [(1, 1), (3, 5), (4, 16), (2, 33)])
@pytest.mark.usefixtures("poison")
def test_kernel_matches_reference(groups, n, combine, scale):
    rewards = rewards_case(groups, n, seed=groups * n)
    rewards[:n] = rewards[0]  # group 0 all equal
    counts = torch.randint(0, 40, (groups * n,), device=DEVICE)
    counts[-1] = 2500  # more than one token block
    kw = dict(combine=combine, scale_rewards=scale, token_counts=counts)
    out, ref = group_advantages(rewards, n, **kw), group_advantages_reference(rewards, n, **kw)
    for name in ("advantages", "token_advantages", "combined_rewards", "group_mean", "group_std"):
        assert max_rel_err(getattr(out, name), getattr(ref, name)) < 1e-5, name
    assert torch.equal(out.zero_std_groups, ref.zero_std_groups) and bool(out.zero_std_groups[0])
    assert torch.equal(out.valid, ref.valid) and bool(out.valid.all())


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.usefixtures("poison")
def test_equal_rewards_give_exact_zero(scale):
    """All-equal groups, a batch of equal rewards and groups of one give advantage exactly 0, never NaN."""
    for rewards, n in ((torch.full((12, 4), 0.37, device=DEVICE), 4), (rewards_case(5, 1), 1)):
        for fn in (group_advantages, group_advantages_reference):
            out = fn(rewards, n, scale_rewards=scale, token_counts=torch.full((rewards.shape[0],), 3, device=DEVICE))
            assert torch.equal(out.advantages.cpu(), torch.zeros(rewards.shape[0]))
            assert torch.equal(out.token_advantages.cpu(), torch.zeros(3 * rewards.shape[0]))
            assert out.num_zero_std_groups == rewards.shape[0] // n


def test_non_finite_reward_raises_naming_the_sample():
    rewards = rewards_case(2, 4)
    rewards[5, 2] = float("nan")
    for fn in (group_advantages, group_advantages_reference):
        with pytest.raises(ValueError, match=r"R_spa of sample 5 \(group 1, member 1\) is nan"):
            fn(rewards, 4)
    rewards[5, 2] = float("inf")
    with pytest.raises(ValueError, match="column 2 of sample 5"):
        group_advantages(rewards, 4, combine="sum")
    group_advantages(rewards, 4, combine=0)  # column 0 is finite: the bad column is not used


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.usefixtures("poison")
def test_masked_samples_leave_the_statistics(scale):
    rewards = rewards_case(3, 5)
    rewards[1, 0] = float("nan")
    rewards[7, 3] = float("-inf")
    rewards[10:15, 1] = float("nan")  # group 2 entirely invalid
    out = group_advantages(rewards, 5, scale_rewards=scale, nan_policy="mask")
    ref = group_advantages_reference(rewards, 5, scale_rewards=scale, nan_policy="mask")
    assert max_rel_err(out.advantages, ref.advantages) < 1e-5
    valid = torch.ones(15, dtype=torch.bool, device=DEVICE)
    valid[[1, 7]] = False
    valid[10:] = False
    assert torch.equal(out.valid, valid) and torch.equal(ref.valid, valid)
    assert torch.equal(out.advantages[~valid].cpu(), torch.zeros(7))
    assert out.zero_std_groups.tolist() == [False, False, True]
    for name in ("group_mean", "group_std"):  # a group with no valid sample: 0, not NaN, in both
        assert torch.equal(getattr(out, name)[2].cpu(), torch.tensor(0.0)), name
        assert torch.equal(getattr(ref, name)[2].cpu(), torch.tensor(0.0)), name
        assert max_rel_err(getattr(out, name), getattr(ref, name)) < 1e-5, name
    # Oracle: drop the masked samples by hand and normalise what is left.
    r = rewards[:, 0] * (rewards[:, 1] + rewards[:, 2]) * rewards[:, 3]
    kept = [r[[0, 2, 3, 4]], r[[5, 6, 8, 9]]]
    batch_std = torch.cat(kept).std()
    for g, (idx, rg) in enumerate(zip(([0, 2, 3, 4], [5, 6, 8, 9]), kept)):
        denom = {"group": rg.std(), "batch": batch_std, "none": None}[scale]
        expected = (rg - rg.mean()) / (denom + 1e-4) if denom is not None else rg - rg.mean()
        assert max_rel_err(out.advantages[idx], expected) < 1e-5
        assert max_rel_err(out.group_std[g], rg.std()) < 1e-5


@pytest.mark.usefixtures("poison")
def test_bf16_rewards():
    rewards = rewards_case(3, 8).bfloat16()
    out = group_advantages(rewards, 8)
    assert max_rel_err(out.advantages, group_advantages_reference(rewards.float(), 8).advantages) < 1e-2


def test_bad_inputs_raise():
    rewards = rewards_case(2, 4)
    with pytest.raises(ValueError, match="groups of group_size=3"):
        group_advantages(rewards, 3)
    with pytest.raises(ValueError, match="needs the 4 columns"):
        group_advantages(rewards[:, :3], 4)
    with pytest.raises(ValueError, match="combine must be"):
        group_advantages(rewards, 4, combine=4)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(rewards, 4, scale_rewards="std")
    with pytest.raises(ValueError, match="token_counts must be"):
        group_advantages(rewards, 4, token_counts=torch.ones(7, dtype=torch.long, device=DEVICE))
    for fn in (group_advantages, group_advantages_reference):
        for group_size in (0, -2, -4):
            with pytest.raises(ValueError, match="groups of group_size"):
                fn(rewards, group_size)
        for combine in (-1, -4, True):  # a negative column would make the kernel read the previous row
            with pytest.raises(ValueError, match="combine must be"):
                fn(rewards, 4, combine=combine)
        counts = torch.ones(8, dtype=torch.long, device=DEVICE)
        counts[3] = -1
        with pytest.raises(ValueError, match="non-negative"):
            fn(rewards, 4, token_counts=counts)


@settings(max_examples=10, deadline=None)
@given(groups=st.integers(1, 5), n=st.integers(1, 20), scale=st.sampled_from(SCALES),
       combine=st.sampled_from(COMBINES), seed=st.integers(0, 2**16))
def test_random_shapes(groups, n, scale, combine, seed):
    rewards = rewards_case(groups, n, seed=seed)
    counts = torch.randint(0, 50, (groups * n,), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    kw = dict(combine=combine, scale_rewards=scale, token_counts=counts)
    out, ref = group_advantages(rewards, n, **kw), group_advantages_reference(rewards, n, **kw)
    assert max_rel_err(out.advantages, ref.advantages) < 1e-5
    assert max_rel_err(out.token_advantages, ref.token_advantages) < 1e-5


def test_bench_reference(benchmark):
    rewards = rewards_case(16, 16)
    counts = torch.full((256,), 876, device=DEVICE)
    benchmark(group_advantages_reference, rewards, 16, token_counts=counts)


@pytest.mark.parametrize("combine", COMBINES)
@pytest.mark.usefixtures("poison")
def test_strided_rewards_and_token_counts_match_reference(combine):
    """A transposed reward matrix (column stride != 1) and a strided token-count view: the kernel must read them as
    the reference does, not assume contiguous rows."""
    rewards = rewards_case(3, 8).T.contiguous().T  # same values, strides (1, 24)
    counts = torch.randint(0, 9, (48,), generator=torch.Generator().manual_seed(1)).to(DEVICE)[::2]
    assert rewards.stride(1) != 1 and not counts.is_contiguous()
    out = group_advantages(rewards, 8, combine=combine, token_counts=counts)
    ref = group_advantages_reference(rewards.contiguous(), 8, combine=combine, token_counts=counts.contiguous())
    assert max_rel_err(out.advantages, ref.advantages) < 1e-5
    assert max_rel_err(out.token_advantages, ref.token_advantages) < 1e-5
