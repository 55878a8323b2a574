using Distributed.Reference;
using Xunit;

namespace Distributed.Kernels.Tests;

/// <summary>
/// The split lightning operations: the intra-chunk result (S0 = 0, dS_end = 0) plus the inter-chunk terms
/// must equal the fp64 reference's whole-chunk forward and backward with S0 and dS_end, for every case of the
/// lightning contract (decay 1, 0.9, 0.01, mixed per head; GQA 4/4, 4/2, 4/1; causal and not; N across tiles).
/// </summary>
public abstract partial class KernelBackendContract
{
    [Theory]
    [MemberData(nameof(LightningCases))]
    public void LightningInterChunkForward_AddedToTheLocalOutput_EqualsTheWholeChunkWithS0(LightningCase c)
    {
        c = c with { WithS0 = true };
        var x = c.Dims;
        var (q, k, v, s0) = LightningInputs(c, 71);
        var decay = c.Decay.Select(f => (double)f).ToArray();
        var (eo, _) = ReferenceAttention.LightningForward(q, k, v, decay, c.Causal, s0, x);
        var (local, _) = ReferenceAttention.LightningForward(q, k, v, decay, c.Causal, null, x);
        using var tq = Upload(q, x.B, x.Nq, x.H, x.D);
        using var tk = Upload(k, x.B, x.Nk, x.Hk, x.D);
        using var tv = Upload(v, x.B, x.Nk, x.Hk, x.Dv);
        using var ts0 = Upload(s0!, x.B, x.H, x.D, x.Dv);
        using var to = Stale(x.B, x.Nq, x.H, x.Dv);
        Backend.LightningForward(tq, tk, tv, c.Decay, c.Causal, null, to, null);
        AssertClose(local, to, "O with S0 = 0");
        Backend.LightningInterChunkForward(tq, c.Decay, c.Causal, ts0, to);
        AssertClose(eo, to, "O local + inter-chunk");
    }

    [Theory]
    [MemberData(nameof(LightningCases))]
    public void LightningInterChunkBackward_AddedToTheLocalGradients_EqualsTheWholeChunk(LightningCase c)
    {
        c = c with { WithS0 = true };
        var x = c.Dims;
        var (q, k, v, s0) = LightningInputs(c, 81);
        var decay = c.Decay.Select(f => (double)f).ToArray();
        var dO = ReferenceAttention.Random((long)x.B * x.Nq * x.H * x.Dv, 85);
        var dSEnd = ReferenceAttention.Random((long)x.B * x.H * x.D * x.Dv, 86, 0.5);
        using var tq = Upload(q, x.B, x.Nq, x.H, x.D);
        using var tk = Upload(k, x.B, x.Nk, x.Hk, x.D);
        using var tv = Upload(v, x.B, x.Nk, x.Hk, x.Dv);
        using var ts0 = Upload(s0!, x.B, x.H, x.D, x.Dv);
        using var tdo = Upload(dO, x.B, x.Nq, x.H, x.Dv);
        using var tdse = Upload(dSEnd, x.B, x.H, x.D, x.Dv);
        // The backend's local gradients (S0 = 0, dS_end = 0), checked, then each variant's inter-chunk terms are
        // added to the reference's local gradients (uploaded), so the local pass runs once.
        var (qdq, qdk, qdv, _) = ReferenceAttention.LightningBackward(q, k, v, decay, c.Causal, null, dO, null, x);
        // ILGPU's CPU accelerator takes seconds per local backward (checked by the main contract); it starts from
        // the reference's local gradients, so its run checks the inter-chunk kernels alone.
        bool slow = Backend.Name == "ilgpu-cpu";
        using (var ldq0 = slow ? Upload(qdq, x.B, x.Nq, x.H, x.D) : Stale(x.B, x.Nq, x.H, x.D))
        using (var ldk0 = slow ? Upload(qdk, x.B, x.Nk, x.Hk, x.D) : Stale(x.B, x.Nk, x.Hk, x.D))
        using (var ldv0 = slow ? Upload(qdv, x.B, x.Nk, x.Hk, x.Dv) : Stale(x.B, x.Nk, x.Hk, x.Dv))
        {
            if (!slow) Backend.LightningBackward(tq, tk, tv, c.Decay, c.Causal, null, tdo, null, ldq0, ldk0, ldv0, null);
            AssertClose(qdq, ldq0, "dQ local");
            AssertClose(qdk, ldk0, "dK local");
            AssertClose(qdv, ldv0, "dV local");
            Backend.LightningInterChunkBackward(tq, tk, tv, c.Decay, c.Causal, ts0, tdo, tdse, ldq0, ldk0, ldv0);
            var (edq, edk, edv, _) = ReferenceAttention.LightningBackward(q, k, v, decay, c.Causal, s0, dO, dSEnd, x);
            AssertClose(edq, ldq0, "dQ local + inter-chunk");
            AssertClose(edk, ldk0, "dK local + inter-chunk");
            AssertClose(edv, ldv0, "dV local + inter-chunk");
        }
        foreach (var (withS0, withEnd, what) in new[] { (false, true, "dS_end only"), (true, false, "S0 only") })
        {
            // The first chunk of a causal sequence has S0 = 0; the last has dS_end = 0.
            var (edq, edk, edv, _) = ReferenceAttention.LightningBackward(q, k, v, decay, c.Causal, withS0 ? s0 : null, dO, withEnd ? dSEnd : null, x);
            using var dq = Upload(qdq, x.B, x.Nq, x.H, x.D);
            using var dk = Upload(qdk, x.B, x.Nk, x.Hk, x.D);
            using var dv = Upload(qdv, x.B, x.Nk, x.Hk, x.Dv);
            Backend.LightningInterChunkBackward(tq, tk, tv, c.Decay, c.Causal, withS0 ? ts0 : null, tdo, withEnd ? tdse : null, dq, dk, dv);
            AssertClose(edq, dq, $"dQ ({what})");
            AssertClose(edk, dk, $"dK ({what})");
            AssertClose(edv, dv, $"dV ({what})");
        }
    }

    [Fact]
    public void LightningInterChunkForward_StateOfTheWrongShape_NamesS0()
    {
        using var q = Backend.Allocate(1, 8, 4, 16);
        using var o = Backend.Allocate(1, 8, 4, 16);
        using var s0 = Backend.Allocate(1, 4, 16, 8);
        var e = Assert.ThrowsAny<ArgumentException>(() => Backend.LightningInterChunkForward(q, [1f, 1f, 1f, 1f], true, s0, o));
        Assert.Equal("s0", e.ParamName);
    }
}
