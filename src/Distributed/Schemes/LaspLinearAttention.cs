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
/// are added after the wait, as the LASP-2 paper designs it.
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
    private readonly float[] _running;      // the prefix or suffix being accumulated
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
        _running = new float[_stateLength];
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
        float[][] s0 = _causal ? Prefixes(_byChunk) : AllButOwn(_byChunk);
        _clock.Compute(() =>
        {
            for (int c = 0; c < _myChunks.Length; c++)
            {
                _prefix[c].CopyFromHost(s0[c]);
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
        float[][] dSEnd = _causal ? Suffixes(_byChunk) : AllButOwn(_byChunk);
        _clock.Compute(() =>
        {
            var dQs = _local.Output("dQ", dQ);
            var dKs = _local.Output("dK", dK);
            var dVs = _local.Output("dV", dV);
            for (int c = 0; c < _myChunks.Length; c++)
            {
                _states[c].CopyFromHost(dSEnd[c]);
                _backend.LightningBackward(_q[c], _k[c], _v[c], _decay, _causal, _prefix[c], dOs[c], _states[c], dQs[c], dKs[c], dVs[c], null);
            }
            _local.Join(dQs, dQ);
            _local.Join(dKs, dK);
            _local.Join(dVs, dV);
        });
    }

    /// <summary>Forward with the all-gather in flight during the intra-chunk outputs (S0 = 0).</summary>
    private void ForwardOverlapped(DeviceTensor q, DeviceTensor k, DeviceTensor v, DeviceTensor o)
    {
        DeviceTensor[] qs = null!, ks = null!, vs = null!, os = null!;
        _clock.Compute(() =>
        {
            qs = _local.Split("q", q);
            ks = _local.Split("k", k);
            vs = _local.Split("v", v);
            os = _local.Output("o", o);
            for (int c = 0; c < _myChunks.Length; c++) _backend.LightningChunkState(ks[c], vs[c], _decay, _causal, _states[c]);
        });
        var inFlight = StartExchange();
        _clock.Compute(() =>
        {
            for (int c = 0; c < _myChunks.Length; c++) _backend.LightningForward(qs[c], ks[c], vs[c], _decay, _causal, null, os[c], null);
        });
        FinishExchange(inFlight);
        float[][] s0 = _causal ? Prefixes(_byChunk) : AllButOwn(_byChunk);
        _clock.Compute(() =>
        {
            for (int c = 0; c < _myChunks.Length; c++)
            {
                _prefix[c].CopyFromHost(s0[c]);
                _backend.LightningInterChunkForward(qs[c], _decay, _causal, _prefix[c], os[c]);
            }
            _local.Join(os, o);
        });
        (_q, _k, _v) = (qs, ks, vs);
    }

    /// <summary>Backward with the all-gather in flight during the local gradients (S0 = 0, dS_end = 0).</summary>
    private void BackwardOverlapped(DeviceTensor dO, DeviceTensor dQ, DeviceTensor dK, DeviceTensor dV)
    {
        DeviceTensor[] dOs = null!;
        _clock.Compute(() =>
        {
            dOs = _local.Split("dO", dO);
            for (int c = 0; c < _myChunks.Length; c++) _backend.LightningChunkStateBackward(_q![c], dOs[c], _decay, _causal, _states[c]);
        });
        var inFlight = StartExchange();
        DeviceTensor[] dQs = null!, dKs = null!, dVs = null!;
        _clock.Compute(() =>
        {
            dQs = _local.Output("dQ", dQ);
            dKs = _local.Output("dK", dK);
            dVs = _local.Output("dV", dV);
            for (int c = 0; c < _myChunks.Length; c++)
                _backend.LightningBackward(_q![c], _k![c], _v![c], _decay, _causal, null, dOs[c], null, dQs[c], dKs[c], dVs[c], null);
        });
        FinishExchange(inFlight);
        float[][] dSEnd = _causal ? Suffixes(_byChunk) : AllButOwn(_byChunk);
        _clock.Compute(() =>
        {
            for (int c = 0; c < _myChunks.Length; c++)
            {
                _states[c].CopyFromHost(dSEnd[c]);
                _backend.LightningInterChunkBackward(_q![c], _k![c], _v![c], _decay, _causal, _prefix[c], dOs[c], _states[c], dQs[c], dKs[c], dVs[c]);
            }
            _local.Join(dQs, dQ);
            _local.Join(dKs, dK);
            _local.Join(dVs, dV);
        });
    }

    /// <summary>Stages the local states and starts the one all-gather; the buffers stay untouched until it is finished.</summary>
    private CommRequest StartExchange()
    {
        CommRequest request = null!;
        _clock.Communicate(() =>
        {
            for (int c = 0; c < _myChunks.Length; c++) _states[c].CopyToHost(_send.AsSpan((int)(c * _stateLength), (int)_stateLength));
            request = _comm.StartAllGather(_send, _gathered);
        });
        return request;
    }

    /// <summary>Waits for the all-gather and files every rank's states by global chunk index.</summary>
    private void FinishExchange(CommRequest request)
    {
        _clock.Communicate(() =>
        {
            request.Wait();
            FileByChunk();
        });
    }

    private void FileByChunk()
    {
        for (int r = 0; r < _comm.Size; r++)
            for (int c = 0; c < _rankChunks[r].Length; c++)
                _gathered.AsSpan((int)((r * _rankChunks[r].Length + c) * _stateLength), (int)_stateLength).CopyTo(_byChunk[_rankChunks[r][c]]);
    }

    /// <summary>The one all-gather: every rank's chunk states, filed by global chunk index.</summary>
    private void ExchangeStates()
    {
        _clock.Communicate(() =>
        {
            for (int c = 0; c < _myChunks.Length; c++) _states[c].CopyToHost(_send.AsSpan((int)(c * _stateLength), (int)_stateLength));
            _comm.AllGather(_send, _gathered);
            FileByChunk();
        });
    }

    /// <summary>S_&lt;g for each local chunk: S_&lt;0 = 0, S_&lt;(g+1) = λ^(L_g) S_&lt;g + M_g.</summary>
    private float[][] Prefixes(float[][] m)
    {
        var result = _result;
        var s = _running;
        Array.Clear(s);
        int last = _myChunks.Max();
        for (int g = 0; g <= last; g++)
        {
            for (int c = 0; c < _myChunks.Length; c++)
                if (_myChunks[c] == g) s.CopyTo(result[c], 0);
            DecayAndAdd(s, g, m[g]);
        }
        return result;
    }

    /// <summary>The gradient reaching each local chunk's outgoing state: T_(g+1), with T_g = dM_g + λ^(L_g) T_(g+1).</summary>
    private float[][] Suffixes(float[][] dm)
    {
        var result = _result;
        var t = _running;
        Array.Clear(t);
        int first = _myChunks.Min();
        for (int g = dm.Length - 1; g >= first; g--)
        {
            for (int c = 0; c < _myChunks.Length; c++)
                if (_myChunks[c] == g) t.CopyTo(result[c], 0);
            DecayAndAdd(t, g, dm[g]);
        }
        return result;
    }

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

    /// <summary>Non-causal: Σ over every other chunk, in chunk order.</summary>
    private float[][] AllButOwn(float[][] states)
    {
        var result = _result;
        for (int c = 0; c < _myChunks.Length; c++)
        {
            var sum = result[c];
            Array.Clear(sum);
            for (int g = 0; g < states.Length; g++)
            {
                if (g == _myChunks[c]) continue;
                var x = states[g];
                for (int i = 0; i < sum.Length; i++) sum[i] += x[i];
            }
            result[c] = sum;
        }
        return result;
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
    public override string Summary => "LASP-2: one all-gather of [B,H,D,Dv] chunk states per pass";
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
