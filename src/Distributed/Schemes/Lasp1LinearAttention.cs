using Distributed.Cluster;
using Distributed.Kernels;

namespace Distributed.Schemes;

/// <summary>
/// LASP-1 for lightning attention (Sun et al., "Linear Attention Sequence Parallelism", 2024): the states
/// travel along a <b>serial chain</b> of point-to-point hops instead of LASP-2's one all-gather. Contiguous
/// layout only (rank r owns chunk r of P, so the chain follows the token order). Forward, causal: rank r
/// computes its chunk state <c>M_r = Σ_j λ^(L_r−1−j) k_jᵀ v_j</c>, waits for <c>S_&lt;r</c> from rank r−1
/// (zero on rank 0), sends <c>S_&lt;(r+1) = λ^(L_r) S_&lt;r + M_r</c> to rank r+1 at once (so the chain's
/// critical path is one add per hop, not a kernel), then runs <c>LightningForward(chunk, S0 = S_&lt;r)</c>.
/// Backward, in reverse: <c>dM_r = Σ_i λ^(i+1) q_iᵀ dO_i</c>, wait for <c>T_(r+1)</c> from rank r+1 (zero on
/// the last rank), send <c>T_r = dM_r + λ^(L_r) T_(r+1)</c> to rank r−1, then
/// <c>LightningBackward(chunk, S0 = S_&lt;r, dS_end = T_(r+1))</c>. Non-causal (decay ignored, as in the
/// kernels): <c>S0 = Σ_(g&lt;r) M_g + Σ_(g&gt;r) M_g</c>, a chain up the ranks and then one down, and the same
/// for dM in the backward pass.
/// Steps: P−1 serial hops per pass causal, 2(P−1) non-causal; each hop carries one B·H·D·Dv state.
/// Bytes per rank per pass (causal): one state sent (all but the last rank, forward; all but rank 0,
/// backward) and one received, whatever N is; but the hops cannot overlap one another, so the time grows
/// with P where LASP-2's all-gather is one collective.
/// </summary>
/// <remarks>
/// The communicator has only paired exchanges, so a one-way hop is a <see cref="ICommunicator.SendRecv"/>
/// in which the receiver sends back an empty message: a rendezvous, as MPI's blocking send of a large
/// message is. Counters then show one SendRecv call per hop on each side, and bytes only for the state.
/// </remarks>
internal sealed class Lasp1LinearAttention : IScheme
{
    private readonly ICommunicator _comm;
    private readonly IKernelBackend _backend;
    private readonly AttentionShape _shape;
    private readonly PhaseClock _clock;
    private readonly bool _causal;
    private readonly float[] _decay;
    private readonly int _length;            // this rank's tokens L_r
    private readonly float[] _own;           // M_r or dM_r on the host
    private readonly float[] _incoming;      // what came down the chain (S_<r or T_(r+1))
    private readonly float[] _outgoing;      // what goes on down the chain
    private readonly float[] _other;         // non-causal: the sum from the other side
    private readonly DeviceTensor _state;    // M_r, then dM_r, then dS_end
    private readonly DeviceTensor _prefix;   // S0 of this chunk, kept for the backward pass
    private DeviceTensor? _q, _k, _v;

    public Lasp1LinearAttention(ICommunicator comm, IKernelBackend backend, AttentionShape shape, SequenceParallelOptions options, ShardLayout layout, PhaseClock clock)
    {
        if (layout != ShardLayout.Contiguous)
            throw new ArgumentException($"LASP-1 passes states along the ranks in token order and takes the contiguous layout only, not {layout.ToString().ToLowerInvariant()}; use --layout contiguous (the default for lasp1).", nameof(layout));
        int p = comm.Size;
        if (shape.SeqLen < p)
            throw new ArgumentException($"seqLen {shape.SeqLen} is shorter than the {p} ranks LASP-1 chains; use a longer sequence or fewer ranks.", nameof(shape));
        _comm = comm;
        _backend = backend;
        _shape = shape;
        _clock = clock;
        _causal = options.Causal;
        _decay = options.Decay ?? Enumerable.Repeat(1f, shape.Heads).ToArray();
        Ranges = Sharding.Ranges(shape.SeqLen, p, comm.Rank, ShardLayout.Contiguous);
        _length = Ranges[0].Count;
        long stateLength = (long)shape.Batch * shape.Heads * shape.HeadDim * shape.ValueDim;
        _own = new float[stateLength];
        _incoming = new float[stateLength];
        _outgoing = new float[stateLength];
        _other = new float[stateLength];
        _state = backend.Allocate(shape.Batch, shape.Heads, shape.HeadDim, shape.ValueDim);
        _prefix = backend.Allocate(shape.Batch, shape.Heads, shape.HeadDim, shape.ValueDim);
    }

    public IReadOnlyList<(int Start, int Count)> Ranges { get; }

    public void Forward(DeviceTensor q, DeviceTensor k, DeviceTensor v, DeviceTensor o)
    {
        _clock.Compute(() => _backend.LightningChunkState(k, v, _decay, _causal, _state));
        float[] s0 = _causal ? PassAlong(up: true, decayed: true) : AllButOwn();
        _clock.Compute(() =>
        {
            _prefix.CopyFromHost(s0);
            _backend.LightningForward(q, k, v, _decay, _causal, _prefix, o, null);
        });
        (_q, _k, _v) = (q, k, v);
    }

    public void Backward(DeviceTensor dO, DeviceTensor dQ, DeviceTensor dK, DeviceTensor dV)
    {
        if (_q is null || _k is null || _v is null) throw new InvalidOperationException("Call Forward before Backward: the backward pass reuses the forward's incoming state.");
        _clock.Compute(() => _backend.LightningChunkStateBackward(_q, dO, _decay, _causal, _state));
        float[] dSEnd = _causal ? PassAlong(up: false, decayed: true) : AllButOwn();
        _clock.Compute(() =>
        {
            _state.CopyFromHost(dSEnd);
            _backend.LightningBackward(_q, _k, _v, _decay, _causal, _prefix, dO, _state, dQ, dK, dV, null);
        });
    }

    /// <summary>
    /// One serial chain over the ranks, up (0 → P−1) or down (P−1 → 0): wait for the running sum from the
    /// previous rank of the chain (zero on its first rank), pass on <c>λ^(L_r)·incoming + own</c> (the
    /// decay only when <paramref name="decayed"/>), and return what came in. Own is <see cref="_state"/>.
    /// </summary>
    private float[] PassAlong(bool up, bool decayed)
    {
        _clock.Communicate(() =>
        {
            int r = _comm.Rank, last = _comm.Size - 1;
            int from = up ? r - 1 : r + 1, to = up ? r + 1 : r - 1;
            _state.CopyToHost(_own);
            if (from >= 0 && from <= last) _comm.SendRecv(ReadOnlySpan<float>.Empty, from, _incoming, from);
            else Array.Clear(_incoming);
            if (to >= 0 && to <= last)
            {
                DecayAndAdd(_incoming, decayed, _own, _outgoing);
                _comm.SendRecv(_outgoing, to, Span<float>.Empty, to);
            }
        });
        return _incoming;
    }

    /// <summary>Non-causal: Σ of every other rank's state, as a chain up the ranks and a chain down.</summary>
    private float[] AllButOwn()
    {
        PassAlong(up: true, decayed: false);
        _incoming.CopyTo(_other, 0);
        PassAlong(up: false, decayed: false);
        for (int i = 0; i < _other.Length; i++) _other[i] += _incoming[i];
        return _other;
    }

    /// <summary>result ← λ_h^(L_r)·acc + x per head (λ = 1 when not <paramref name="decayed"/>).</summary>
    private void DecayAndAdd(float[] acc, bool decayed, float[] x, float[] result)
    {
        int perHead = _shape.HeadDim * _shape.ValueDim;
        for (int b = 0; b < _shape.Batch; b++)
            for (int h = 0; h < _shape.Heads; h++)
            {
                float w = decayed ? (float)Math.Pow(_decay[h], _length) : 1f;
                int off = (b * _shape.Heads + h) * perHead;
                for (int i = off; i < off + perHead; i++) result[i] = w * acc[i] + x[i];
            }
    }

    public void Dispose()
    {
        _state.Dispose();
        _prefix.Dispose();
    }
}

/// <summary>Registration of <see cref="Lasp1LinearAttention"/>.</summary>
internal sealed class Lasp1Descriptor : SchemeDescriptor
{
    public override string CliName => "lasp1";
    public override IReadOnlyList<AttentionKind> Kinds { get; } = [AttentionKind.Lightning];
    public override string Summary => "LASP-1: chunk states along a serial chain of P-1 point-to-point hops per pass (the LASP-2 paper's baseline)";
    public override ShardLayout DefaultLayout(SequenceParallelOptions options) => ShardLayout.Contiguous;

    public override void Validate(AttentionShape shape, SequenceParallelOptions options, int ranks)
    {
        if (options.Layout == ShardLayout.Zigzag)
            throw new ArgumentException("LASP-1 chains the ranks in token order and takes the contiguous layout only; use Layout = Contiguous (--layout contiguous), or leave it unset.", nameof(options));
    }

    public override IScheme Create(SchemeSetup s) => new Lasp1LinearAttention(s.Communicator, s.Backend, s.Shape, s.Options, s.Layout, s.Clock);

    public override MemoryEstimate Estimate(AttentionShape shape, SequenceParallelOptions options, int ranks, ShardLayout layout)
    {
        // Device: the state and the kept S0; host: own, incoming, outgoing and the other side's sum.
        var z = new EstimateSizes(shape, ranks, layout);
        long state = z.B * z.H * z.D * z.Dv;
        return new MemoryEstimate(z.Caller, 2 * state, 4 * state, state);
    }
}

