"""The compile report's reading of collectives from HLO text: bytes each chip sends, per kind and group."""


def test_collective_bytes_are_read_per_kind_and_group():
    """Each kind's bytes per chip from HLO text, in the three replica-group forms and async starts."""
    from k2jax.report import collective_moves, group_size

    hlo = "\n".join([
        "%a = bf16[1024,128]{1,0} all-gather(%x), replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, dims={0}",
        "%b = f32[256]{0} reduce-scatter(%y), replica_groups=[2,4]<=[8], dimensions={0}",
        "%c = (f32[64]{0}, f32[32]{0}) all-reduce(%u, %v), replica_groups={{0,1},{2,3},{4,5},{6,7}}",
        "%d = s32[8,16]{1,0} all-to-all(%z), replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0','axis_1'}",
        "%e = (bf16[16]{0}, bf16[64]{0}) all-gather-start(%w), replica_groups=[2,4]<=[8]",
        "%f = bf16[64]{0} all-gather-done(%e)",
    ])
    moved = collective_moves(hlo)
    assert moved["all-gather"] == 1024 * 128 * 2 * 3 / 4 + 64 * 2 * 3 / 4  # the start's result, not its operand
    assert moved["reduce-scatter"] == 256 * 4 * 3
    assert moved["all-reduce"] == 2 * (64 + 32) * 4 * 1 / 2
    assert moved["all-to-all"] == 8 * 16 * 4 * 7 / 8
    assert group_size("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}") == 2


def test_a_memory_only_report_prints_no_cost_lines():
    """cost=False (FLOPs and time not measured): the report ends at the memory verdict, with no 'nan' figures;
    with FLOPs measured it goes on to MFU."""
    from k2jax.report import Report

    args = ("v5p-8", {"fsdp": 4}, "train", 4, 95 * 2**30, 2**30, 2**30, 2**30, 2**30)
    bare = Report(*args, float("nan"), 1e15, float("nan"), 4096, 1.0, 0).lines(459e12)
    assert len(bare) == 3 and bare[-1].endswith("FITS") and "nan" not in "\n".join(bare)
    full = Report(*args, 2e15, 1e15, 2.0, 4096, 1.0, 0).lines(459e12)
    assert any("MFU" in line for line in full) and "nan" not in "\n".join(full)
