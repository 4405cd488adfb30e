"""kernels/multi_tensor.py: the launch tables of a tensor list, their alignment groups and their cache."""

import pytest
import torch

multi_tensor = pytest.importorskip("fastforget.kernels.multi_tensor", reason="triton is not importable")
BLOCK = 4096


def expected_tables(roles, members):
    rows = [[role[t].data_ptr() for t in members] for role in roles]
    rows += [[role[t].numel() for t in members] for role in roles]
    return torch.tensor(rows + [members])


def test_tables_encode_pointers_sizes_members_and_blocks():
    multi_tensor.TABLES.clear()
    params = [torch.zeros(2 * BLOCK + 3), torch.zeros(0), torch.zeros(5, dtype=torch.bfloat16), torch.zeros(BLOCK)]
    grads = [torch.zeros_like(p) for p in params]
    groups, total = multi_tensor.launch_groups((params, grads), BLOCK)
    assert [g.members for g in groups] == [[0, 1, 3], [2]] and total == 3 + 0 + 1 + 1
    fp32 = groups[0]
    assert torch.equal(fp32.tables.cpu(), expected_tables((params, grads), [0, 1, 3]))
    assert fp32.blocks.tolist() == [[0, 0, 0, 2], [0, BLOCK, 2 * BLOCK, 0], [0, 0, 0, 3]]
    assert fp32.blocks_per_tensor == [3, 0, 1]
    assert groups[1].first_block == 4 and groups[1].aligned


def test_misaligned_tensors_get_their_own_group():
    multi_tensor.TABLES.clear()
    aligned = torch.zeros(100)
    view = torch.zeros(101)[1:]  # starts 4 bytes into its storage
    groups, _ = multi_tensor.launch_groups(([aligned, view, aligned.clone()],), BLOCK)
    assert [(g.members, g.aligned) for g in groups] == [([0, 2], True), ([1], False)]
    # a caller's own condition (fisher_update: stacked samples that start misaligned) also makes a group unaligned
    groups, _ = multi_tensor.launch_groups(([aligned, aligned.clone()],), BLOCK, [True, False])
    assert [(g.members, g.aligned) for g in groups] == [([0], True), ([1], False)]


def test_cache_hits_on_the_same_tensors_and_misses_on_any_change():
    multi_tensor.TABLES.clear()
    base = torch.zeros(3 * BLOCK, dtype=torch.bfloat16)
    tensors = [base, torch.zeros(7)]
    first = multi_tensor.launch_groups((tensors,), BLOCK)
    assert multi_tensor.launch_groups(([base, tensors[1]],), BLOCK)[0] is first[0]  # a new list, the same tensors
    changes = {
        "pointer": [base.clone(), tensors[1]],
        "size": [base[:-1], tensors[1]],
        "dtype": [base.view(torch.float16), tensors[1]],
        "block size": tensors,
        "order": tensors[::-1],
    }
    for change, changed in changes.items():
        block = BLOCK // 2 if change == "block size" else BLOCK
        groups, total = multi_tensor.launch_groups((changed,), block)
        assert groups is not first[0], change
        members = [m for g in groups for m in g.members]
        assert torch.equal(torch.cat([g.tables.cpu() for g in groups], 1), expected_tables((changed,), members))
        assert total == sum(-(-t.numel() // block) for t in changed), change


def test_cache_is_bounded_in_entries_and_bytes_least_recently_used_first():
    cache = multi_tensor.TableCache(entries=3, max_bytes=100)
    for key in "abc":
        cache.put(key, key.upper(), 10)
    assert cache.get("a") == "A"  # now the most recently used: b, c, a
    cache.put("d", "D", 10)  # 4 entries: b goes
    assert [k for k in "abcd" if k in cache] == ["a", "c", "d"] and cache.bytes == 30
    cache.put("e", "E", 85)  # 4 entries: c goes; 105 bytes: a goes
    assert [k for k in "acde" if k in cache] == ["d", "e"] and cache.bytes == 95
    assert multi_tensor.TABLES.entries == multi_tensor.CACHE_ENTRIES


def test_the_global_cache_stays_bounded():
    multi_tensor.TABLES.clear()
    tensors = [torch.zeros(3) for _ in range(multi_tensor.CACHE_ENTRIES + 10)]  # alive: each its own pointer
    for t in tensors:
        multi_tensor.launch_groups(([t],), BLOCK)
    assert len(multi_tensor.TABLES) == multi_tensor.CACHE_ENTRIES
