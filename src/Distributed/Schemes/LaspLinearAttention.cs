using Distributed.Cluster;
using Distributed.Kernels;

namespace Distributed.Schemes;

/// <summary>
/// LASP-2 for lightning attention, with per-head decay. The sequence is cut into chunks (P contiguous, or
/// 2P zigzag with two per rank). Forward: each rank computes its chunk states
/// <c>M_g = Σ_j λ^(L_g−1−j) k_jᵀ v_j</c>, <b>one all-gather</b> of all states, then the prefix
/// <c>S_&lt;g</c> by the recursion <c>S_&lt;(g+1) = λ^(L_g) S_&lt;g + M_g</c> (no division, so no underflow
/// trap), and <c>O_g = LightningForward(chunk, S0 = S_&lt;g)</c>. Backward: <c>dM_g = Σ_i λ^(i+1) q_iᵀ dO_i</c>,
/// <b>one all-gather</b>, the suffix <c>T_g = dM_g + λ^(L_g) T_(g+1)</c>, and
/// <c>LightningBackward(chunk, S0 = S_&lt;g, dS_end = T_(g+1))</c>. Non-causal: <c>S0 = Σ_(g'≠g) M_g'</c>
/// and <c>dS_end = Σ_(g'≠g) dM_g'</c>. Bytes per rank: chunks × B·H·D·Dv floats, whatever N is.
/// With <see cref="SequenceParallelOptions.Overlap"/> (the default) the all-gather is started right after the
/// chunk states and the intra-chunk work (S0 = 0, dS_end = 0) runs while it is in flight; the inter-chunk terms
/// (<see cref="IKernelBackend.LightningInterChunkForward"/>, <see cref="IKernelBackend.LightningInterChunkBackward"/>)
/// are added after the wait, as the LASP-2 paper designs it. Zigzag overlapped sends the same bytes as one
/// all-gather per half (each rank's first chunks, then its second ones; the reverse in backward), each started
/// as soon as its states exist, and adds each chunk's inter-chunk term as soon as the halves it needs arrived.
/// </summary>
internal sealed class LaspLinearAttention : IScheme
{
    private readonly ICommunicator _comm;
    private readonly IKernelBackend _backend;
    private readonly AttentionShape _shape;
    private readonly PhaseClock _clock;
    private readonly bool _causal;
    private readonly bool _overlap;
    private readonly float[] _decay;
    private readonly int[] _chunkLength;   // per global chunk
    private readonly int[] _myChunks;      // global chunk index of each local range
    private readonly int[][] _rankChunks;  // global chunk indices of each rank's ranges, in its local order
    private readonly LocalChunks _local;
    private readonly long _stateLength;
    private readonly float[] _send;
    private readonly float[] _gathered;
    private readonly float[][] _byChunk;   // every chunk's state, filed by global chunk index (reused)
    private readonly float[][] _result;    // per local chunk: S0 or dS_end (reused)
    private readonly bool[] _filed;         // which global chunks' states have arrived this pass
    private readonly DeviceTensor[] _states;   // per local chunk: M, then S0 (forward) or dM, then dS_end (backward)
    private readonly DeviceTensor[] _prefix;   // per local chunk: S_<g, kept for the backward pass
    private DeviceTensor[]? _q, _k, _v;

    public LaspLinearAttention(ICommunicator comm, IKernelBackend backend, AttentionShape shape, SequenceParallelOptions options, ShardLayout layout, PhaseClock clock)
    {
        _comm = comm;
        _backend = backend;
        _shape = shape;
        _clock = clock;
        _causal = options.Causal;
        _overlap = options.Overlap;
        _decay = options.Decay ?? Enumerable.Repeat(1f, shape.Heads).ToArray();
        int p = comm.Size;
        int chunks = layout == ShardLayout.Zigzag ? 2 * p : p;
        if (shape.SeqLen < chunks)
            throw new ArgumentException($"seqLen {shape.SeqLen} is shorter than the {chunks} chunks LASP-2 needs over {p} ranks ({layout.ToString().ToLowerInvariant()}); use a longer sequence or fewer ranks.", nameof(shape));
        _chunkLength = Enumerable.Range(0, chunks).Select(g => Sharding.Chunk(shape.SeqLen, chunks, g).Count).ToArray();
        _rankChunks = Enumerable.Range(0, p).Select(r => layout == ShardLayout.Zigzag ? new[] { r, chunks - 1 - r } : new[] { r }).ToArray();
        _myChunks = _rankChunks[comm.Rank];
        Ranges = Sharding.Ranges(shape.SeqLen, p, comm.Rank, layout);
        _local = new LocalChunks(backend, Ranges);
        _stateLength = (long)shape.Batch * shape.Heads * shape.HeadDim * shape.ValueDim;
        _send = HostBuffer.Allocate(_myChunks.Length * _stateLength);    // device → host: page-locked for ILGPU
        _gathered = new float[p * _send.Length];
        _byChunk = Enumerable.Range(0, chunks).Select(_ => new float[_stateLength]).ToArray();
        _result = _myChunks.Select(_ => HostBuffer.Allocate(_stateLength)).ToArray();  // host → device
        _filed = new bool[chunks];
        _states = _myChunks.Select(_ => backend.Allocate(shape.Batch, shape.Heads, shape.HeadDim, shape.ValueDim)).ToArray();
        _prefix = _myChunks.Select(_ => backend.Allocate(shape.Batch, shape.Heads, shape.HeadDim, shape.ValueDim)).ToArray();
    }

    public IReadOnlyList<(int Start, int Count)> Ranges { get; }

    public void Forward(DeviceTensor q, DeviceTensor k, DeviceTensor v, DeviceTensor o)
    {
        if (_overlap)
        {
            ForwardOverlapped(q, k, v, o);
            return;
        }
        DeviceTensor[] qs = null!, ks = null!, vs = null!, os = null!;
        _clock.Compute(() =>
        {
            qs = _local.Split("q", q);
            ks = _local.Split("k", k);
            vs = _local.Split("v", v);
            os = _local.Output("o", o);
            for (int c = 0; c < _myChunks.Length; c++) _backend.LightningChunkState(ks[c], vs[c], _decay, _causal, _states[c]);
        });
        ExchangeStates();
        _clock.Compute(() =>
        {
            for (int c = 0; c < _myChunks.Length; c++)
            {
                _prefix[c].CopyFromHost(_causal ? Prefix(c) : AllButOwn(c));
                _backend.LightningForward(qs[c], ks[c], vs[c], _decay, _causal, _prefix[c], os[c], null);
            }
            _local.Join(os, o);
        });
        (_q, _k, _v) = (qs, ks, vs);
    }

    public void Backward(DeviceTensor dO, DeviceTensor dQ, DeviceTensor dK, DeviceTensor dV)
    {
        if (_q is null || _k is null || _v is null) throw new InvalidOperationException("Call Forward before Backward: the backward pass reuses the forward's prefix states.");
        if (_overlap)
        {
            BackwardOverlapped(dO, dQ, dK, dV);
            return;
        }
        DeviceTensor[] dOs = null!;
        _clock.Compute(() =>
        {
            dOs = _local.Split("dO", dO);
            for (int c = 0; c < _myChunks.Length; c++) _backend.LightningChunkStateBackward(_q[c], dOs[c], _decay, _causal, _states[c]);
        });
        ExchangeStates();
        _clock.Compute(() =>
        {
            var dQs = _local.Output("dQ", dQ);
            var dKs = _local.Output("dK", dK);
            var dVs = _local.Output("dV", dV);
            for (int c = 0; c < _myChunks.Length; c++)
            {
                _states[c].CopyFromHost(_causal ? Suffix(c) : AllButOwn(c));
                _backend.LightningBackward(_q[c], _k[c], _v[c], _decay, _causal, _prefix[c], dOs[c], _states[c], dQs[c], dKs[c], dVs[c], null);
            }
            _local.Join(dQs, dQ);
            _local.Join(dKs, dK);
            _local.Join(dVs, dV);
        });
    }

    /// <summary>
    /// Forward with the states in flight during the intra-chunk outputs (S0 = 0). Each local chunk's state
    /// travels in its own all-gather (one per zigzag half), started as soon as it is computed, so the first
    /// half is on the wire while the second half's state is computed; after the intra-chunk work the
    /// first chunk's inter-chunk term (which needs only the first halves) runs while the second half arrives.
    /// </summary>
    private void ForwardOverlapped(DeviceTensor q, DeviceTensor k, DeviceTensor v, DeviceTensor o)
    {
        DeviceTensor[] qs = null!, ks = null!, vs = null!, os = null!;
        _clock.Compute(() =>
        {
            qs = _local.Split("q", q);
            ks = _local.Split("k", k);
            vs = _local.Split("v", v);
            os = _local.Output("o", o);
        });
        Array.Clear(_filed);
        var inFlight = new CommRequest[_myChunks.Length];
        for (int c = 0; c < _myChunks.Length; c++)
        {
            _clock.Compute(() => _backend.LightningChunkState(ks[c], vs[c], _decay, _causal, _states[c]));
            inFlight[c] = StartPiece(c);
        }
        _clock.Compute(() =>
        {
            for (int c = 0; c < _myChunks.Length; c++) _backend.LightningForward(qs[c], ks[c], vs[c], _decay, _causal, null, os[c], null);
        });
        // Causal: chunk c (global r for c = 0, 2P−1−r for c = 1) needs the states of every chunk before it,
        // which are the pieces 0..c. Non-causal: every chunk needs every piece.
        for (int c = 0; c < _myChunks.Length; c++)
        {
            FinishPiece(inFlight[c], c);
            if (!_causal && c < _myChunks.Length - 1) continue;
            for (int done = _causal ? c : 0; done <= c; done++)
            {
                var s0 = _causal ? Prefix(done) : AllButOwn(done);
                _clock.Compute(() =>
                {
                    _prefix[done].CopyFromHost(s0);
                    _backend.LightningInterChunkForward(qs[done], _decay, _causal, _prefix[done], os[done]);
                });
            }
        }
        _clock.Compute(() => _local.Join(os, o));
        (_q, _k, _v) = (qs, ks, vs);
    }

    /// <summary>
    /// Backward with the dM states in flight during the local gradients (S0 = 0, dS_end = 0), in the mirror
    /// order of the forward: the last local chunk's dM first, since causal dS_end of chunk 2P−1−r needs only
    /// the second halves.
    /// </summary>
    private void BackwardOverlapped(DeviceTensor dO, DeviceTensor dQ, DeviceTensor dK, DeviceTensor dV)
    {
        DeviceTensor[] dOs = null!;
        _clock.Compute(() => dOs = _local.Split("dO", dO));
        int last = _myChunks.Length - 1;
        Array.Clear(_filed);
        var inFlight = new CommRequest[_myChunks.Length];
        for (int c = last; c >= 0; c--)
        {
            _clock.Compute(() => _backend.LightningChunkStateBackward(_q![c], dOs[c], _decay, _causal, _states[c]));
            inFlight[c] = StartPiece(c);
        }
        DeviceTensor[] dQs = null!, dKs = null!, dVs = null!;
        _clock.Compute(() =>
        {
            dQs = _local.Output("dQ", dQ);
            dKs = _local.Output("dK", dK);
            dVs = _local.Output("dV", dV);
            for (int c = 0; c < _myChunks.Length; c++)
                _backend.LightningBackward(_q![c], _k![c], _v![c], _decay, _causal, null, dOs[c], null, dQs[c], dKs[c], dVs[c], null);
        });
        for (int c = last; c >= 0; c--)
        {
            FinishPiece(inFlight[c], c);
            if (!_causal && c > 0) continue;
            for (int done = _causal ? c : last; done >= c; done--)
            {
                var dSEnd = _causal ? Suffix(done) : AllButOwn(done);
                _clock.Compute(() =>
                {
                    _states[done].CopyFromHost(dSEnd);
                    _backend.LightningInterChunkBackward(_q![done], _k![done], _v![done], _decay, _causal, _prefix[done], dOs[done], _states[done], dQs[done], dKs[done], dVs[done]);
                });
            }
        }
        _clock.Compute(() =>
        {
            _local.Join(dQs, dQ);
            _local.Join(dKs, dK);
            _local.Join(dVs, dV);
        });
    }

    /// <summary>Stages local chunk c's state and starts its all-gather (piece c: every rank's c-th chunk); the
    /// buffers stay untouched until it is finished.</summary>
    private CommRequest StartPiece(int c)
    {
        CommRequest request = null!;
        _clock.Communicate(() =>
        {
            var send = _send.AsMemory((int)(c * _stateLength), (int)_stateLength);
            _states[c].CopyToHost(send.Span);
            request = _comm.StartAllGather(send, _gathered.AsMemory((int)(c * _comm.Size * _stateLength), (int)(_comm.Size * _stateLength)));
        });
        return request;
    }

    /// <summary>Waits for piece c and files every rank's c-th chunk state by global chunk index.</summary>
    private void FinishPiece(CommRequest request, int c)
    {
        _clock.Communicate(() =>
        {
            request.Wait();
            for (int r = 0; r < _comm.Size; r++)
                File(_rankChunks[r][c], _gathered.AsSpan((int)((c * _comm.Size + r) * _stateLength), (int)_stateLength));
        });
    }

    /// <summary>The blocking path: one all-gather of every local state, filed by global chunk index.</summary>
    private void ExchangeStates()
    {
        _clock.Communicate(() =>
        {
            Array.Clear(_filed);
            for (int c = 0; c < _myChunks.Length; c++) _states[c].CopyToHost(_send.AsSpan((int)(c * _stateLength), (int)_stateLength));
            _comm.AllGather(_send, _gathered);
            for (int r = 0; r < _comm.Size; r++)
                for (int c = 0; c < _rankChunks[r].Length; c++)
                    File(_rankChunks[r][c], _gathered.AsSpan((int)((r * _rankChunks[r].Length + c) * _stateLength), (int)_stateLength));
        });
    }

    private void File(int g, ReadOnlySpan<float> state)
    {
        state.CopyTo(_byChunk[g]);
        _filed[g] = true;
    }

    /// <summary>S_&lt;g for local chunk c (g its global index): S_&lt;0 = 0, S_&lt;(g+1) = λ^(L_g) S_&lt;g + M_g.</summary>
    private float[] Prefix(int c)
    {
        var s = _result[c];
        Array.Clear(s);
        for (int g = 0; g < _myChunks[c]; g++) DecayAndAdd(s, g, Filed(g));
        return s;
    }

    /// <summary>The gradient reaching local chunk c's outgoing state: T_(g+1), with T_g = dM_g + λ^(L_g) T_(g+1).</summary>
    private float[] Suffix(int c)
    {
        var t = _result[c];
        Array.Clear(t);
        for (int g = _byChunk.Length - 1; g > _myChunks[c]; g--) DecayAndAdd(t, g, Filed(g));
        return t;
    }

    /// <summary>A gathered state; refuses one whose piece has not arrived yet (an ordering bug would read stale data).</summary>
    private float[] Filed(int g) => _filed[g] ? _byChunk[g] : throw new InvalidOperationException($"LASP-2: the state of chunk {g} is read before its all-gather finished.");

    /// <summary>acc ← λ_h^(L_g) acc + x, per head.</summary>
    private void DecayAndAdd(float[] acc, int g, float[] x)
    {
        int perHead = _shape.HeadDim * _shape.ValueDim;
        for (int b = 0; b < _shape.Batch; b++)
            for (int h = 0; h < _shape.Heads; h++)
            {
                float w = (float)Math.Pow(_decay[h], _chunkLength[g]);
                int off = (b * _shape.Heads + h) * perHead;
                for (int i = off; i < off + perHead; i++) acc[i] = w * acc[i] + x[i];
            }
    }

    /// <summary>Non-causal: Σ over every chunk but local chunk c's own, in chunk order.</summary>
    private float[] AllButOwn(int c)
    {
        var sum = _result[c];
        Array.Clear(sum);
        for (int g = 0; g < _byChunk.Length; g++)
        {
            if (g == _myChunks[c]) continue;
            var x = Filed(g);
            for (int i = 0; i < sum.Length; i++) sum[i] += x[i];
        }
        return sum;
    }

    public void Dispose()
    {
        foreach (var t in _states) t.Dispose();
        foreach (var t in _prefix) t.Dispose();
        _local.Dispose();
    }
}

/// <summary>Registration of <see cref="LaspLinearAttention"/>.</summary>
internal sealed class Lasp2Descriptor : SchemeDescriptor
{
    public override string CliName => "lasp2";
    public override IReadOnlyList<AttentionKind> Kinds { get; } = [AttentionKind.Lightning];
    public override string Summary => "LASP-2: [B,H,D,Dv] chunk states all-gathered once per pass (in two halves when overlapped)";
    public override ShardLayout DefaultLayout(SequenceParallelOptions options) => options.Causal ? ShardLayout.Zigzag : ShardLayout.Contiguous;
    public override IScheme Create(SchemeSetup s) => new LaspLinearAttention(s.Communicator, s.Backend, s.Shape, s.Options, s.Layout, s.Clock);

    public override MemoryEstimate Estimate(AttentionShape shape, SequenceParallelOptions options, int ranks, ShardLayout layout)
    {
        var z = new EstimateSizes(shape, ranks, layout);
        long state = z.B * z.H * z.D * z.Dv, perRank = z.Chunks / ranks;
        long scheme = 2 * perRank * state + (z.CopiedParts ? z.B * z.T * 2 * (z.QRow + z.KRow + z.VRow + z.ORow) : 0);
        long staging = perRank * state * (1 + ranks) + z.Chunks * state + 2 * perRank * state;
        return new MemoryEstimate(z.Caller, scheme, staging, ranks * perRank * state);
    }
}
