using Distributed.Cluster;
using Distributed.Kernels;

namespace Distributed.Schemes;

/// <summary>
/// 2-D parallelism, <c>P = Ph × Ps</c>, built from two communicator splits. The sequence is first cut over
/// the Ps head groups by the sequence scheme's layout (zigzag for causal); inside a group of Ph ranks,
/// Ulysses all-to-alls turn the group's tokens × all heads into all the group's tokens × H/Ph heads.
/// Across groups, the Ps ranks that hold the same heads run the sequence scheme on them: LASP-2 for
/// lightning, all-gather KV, ring or partial states for softmax. Backward mirrors it.
/// </summary>
internal sealed class HybridAttention : IScheme
{
    /// <summary>The two communicator splits of one layer (disposed with the layer's shared resources).</summary>
    private sealed record SplitPair(ICommunicator Group, ICommunicator Sequence) : IDisposable
    {
        public void Dispose()
        {
            Group.Dispose();
            Sequence.Dispose();
        }
    }

    private readonly ICommunicator _comm, _groupComm, _sequenceComm;
    private readonly IScheme _inner;
    private readonly HeadShuffle _shuffle;
    private readonly AttentionShape _s;
    private readonly int _hl, _kvl;
    private readonly bool _expand;
    private readonly IKernelBackend _backend;
    private readonly DeviceTensor _q, _k, _v, _o, _dO, _dQ, _dK, _dV;

    /// <summary>The sequence scheme across head groups: LASP-2 for lightning, the chosen one for softmax.</summary>
    internal static ParallelScheme SequenceScheme(SequenceParallelOptions options) =>
        options.Attention == AttentionKind.Lightning ? ParallelScheme.Lasp2 : options.HybridSequenceScheme;

    public HybridAttention(SchemeSetup setup)
    {
        var (comm, backend, shape, options, layout, clock) = (setup.Communicator, setup.Backend, setup.Shape, setup.Options, setup.Layout, setup.Clock);
        int p = comm.Size;
        int ph = options.UlyssesDegree > 0 ? options.UlyssesDegree : Enumerable.Range(1, p).Where(d => p % d == 0 && shape.Heads % d == 0).Max();
        if (p % ph != 0 || shape.Heads % ph != 0)
            throw new ArgumentException($"The Ulysses degree Ph = {ph} must divide both P = {p} and H = {shape.Heads}; valid choices: {string.Join(", ", Enumerable.Range(1, p).Where(d => p % d == 0 && shape.Heads % d == 0))}.", nameof(options));
        _s = shape;
        _comm = comm;
        _backend = backend;
        // Ranks g·Ph … g·Ph+Ph−1 form head group g; ranks with the same index inside their group share heads.
        // The splits are collective, so they are made once per layer and shared by every saved context.
        (_groupComm, _sequenceComm) = setup.Shared.Get("hybrid.splits", () => new SplitPair(comm.Split(comm.Rank / ph, comm.Rank % ph), comm.Split(comm.Rank % ph, comm.Rank / ph)));
        _hl = shape.Heads / ph;
        _expand = shape.KvHeads % ph != 0;
        _kvl = _expand ? _hl : shape.KvHeads / ph;
        int slice = _groupComm.Rank;
        var innerShape = shape with { Heads = _hl, KvHeads = _kvl };
        var innerScheme = SequenceScheme(options);
        var innerOptions = options with
        {
            Scheme = innerScheme,
            Decay = options.Decay?.Skip(slice * _hl).Take(_hl).ToArray(),
            Layout = layout,
        };
        _inner = SchemeRegistry.Get(innerScheme).Create(setup with { Communicator = _sequenceComm, Shape = innerShape, Options = innerOptions });
        // The group's tokens (in the sequence scheme's local order) are split contiguously over its Ph ranks.
        var groupRanges = _inner.Ranges;
        int groupTokens = groupRanges.Sum(r => r.Count);
        if (groupTokens < ph)
            throw new ArgumentException($"Each head group holds {groupTokens} tokens, fewer than its {ph} ranks; use a longer sequence or a smaller Ulysses degree.", nameof(shape));
        var virtualRanges = Sharding.AllRanges(groupTokens, ph, ShardLayout.Contiguous);
        _shuffle = new HeadShuffle(_groupComm, clock, shape.Batch, groupTokens, virtualRanges, shape.Heads / shape.KvHeads);
        Ranges = ToGlobal(virtualRanges[_groupComm.Rank][0], groupRanges);
        int b = shape.Batch;
        _q = backend.Allocate(b, groupTokens, _hl, shape.HeadDim);
        _k = backend.Allocate(b, groupTokens, _kvl, shape.HeadDim);
        _v = backend.Allocate(b, groupTokens, _kvl, shape.ValueDim);
        _o = backend.Allocate(b, groupTokens, _hl, shape.ValueDim);
        _dO = backend.Allocate(b, groupTokens, _hl, shape.ValueDim);
        _dQ = backend.Allocate(b, groupTokens, _hl, shape.HeadDim);
        _dK = backend.Allocate(b, groupTokens, _kvl, shape.HeadDim);
        _dV = backend.Allocate(b, groupTokens, _kvl, shape.ValueDim);
    }

    public IReadOnlyList<(int Start, int Count)> Ranges { get; }

    /// <summary>Maps [start, start+count) of the group's concatenated ranges to global token ranges.</summary>
    private static List<(int Start, int Count)> ToGlobal((int Start, int Count) local, IReadOnlyList<(int Start, int Count)> groupRanges)
    {
        var result = new List<(int, int)>();
        int offset = 0, from = local.Start, end = local.Start + local.Count;
        foreach (var (start, count) in groupRanges)
        {
            int lo = Math.Max(from, offset), hi = Math.Min(end, offset + count);
            if (lo < hi) result.Add((start + lo - offset, hi - lo));
            offset += count;
        }
        return result;
    }

    public void Forward(DeviceTensor q, DeviceTensor k, DeviceTensor v, DeviceTensor o) => Mirrored(() => ForwardCore(q, k, v, o));

    public void Backward(DeviceTensor dO, DeviceTensor dQ, DeviceTensor dK, DeviceTensor dV) => Mirrored(() => BackwardCore(dO, dQ, dK, dV));

    /// <summary>
    /// The traffic runs on the two split groups, whose counters the caller never sees; their calls and
    /// bytes are added to the caller's communicator so "bytes per rank" stays true for the hybrid.
    /// </summary>
    private void Mirrored(Action step)
    {
        var before = new[] { _groupComm.Counters.Snapshot(), _sequenceComm.Counters.Snapshot() };
        step();
        var after = new[] { _groupComm.Counters.Snapshot(), _sequenceComm.Counters.Snapshot() };
        for (int g = 0; g < 2; g++)
            foreach (var (op, now) in after[g])
            {
                var was = before[g].TryGetValue(op, out var c) ? c : default;
                long calls = now.Calls - was.Calls;
                for (long i = 0; i < calls; i++)
                    _comm.Counters.Record(op, i == 0 ? now.BytesSent - was.BytesSent : 0, i == 0 ? now.BytesReceived - was.BytesReceived : 0);
            }
    }

    private void ForwardCore(DeviceTensor q, DeviceTensor k, DeviceTensor v, DeviceTensor o)
    {
        _shuffle.ToHeads([
            new HeadPart(q, _s.Heads, _q, _s.HeadDim, false),
            new HeadPart(k, _s.KvHeads, _k, _s.HeadDim, _expand),
            new HeadPart(v, _s.KvHeads, _v, _s.ValueDim, _expand)]);
        _inner.Forward(_q, _k, _v, _o);
        _shuffle.ToSequence([new HeadPart(o, _s.Heads, _o, _s.ValueDim, false)]);
    }

    private void BackwardCore(DeviceTensor dO, DeviceTensor dQ, DeviceTensor dK, DeviceTensor dV)
    {
        _shuffle.ToHeads([new HeadPart(dO, _s.Heads, _dO, _s.ValueDim, false)]);
        _inner.Backward(_dO, _dQ, _dK, _dV);
        _shuffle.ToSequence([
            new HeadPart(dQ, _s.Heads, _dQ, _s.HeadDim, false),
            new HeadPart(dK, _s.KvHeads, _dK, _s.HeadDim, _expand),
            new HeadPart(dV, _s.KvHeads, _dV, _s.ValueDim, _expand)]);
    }

    /// <summary>Collective: the sequence scheme's LSE of this group's heads, then back to sequence shards over the group.</summary>
    public void CopyLse(DeviceTensor lse)
    {
        using var groupLse = _backend.Allocate(_s.Batch, _hl, _q.Shape[1]);
        _inner.CopyLse(groupLse);
        _shuffle.LseToSequence(_backend, groupLse, lse, _s.Heads);
    }

    public void Dispose()
    {
        foreach (var t in new[] { _q, _k, _v, _o, _dO, _dQ, _dK, _dV }) t.Dispose();
        _inner.Dispose();
    }
}

/// <summary>Registration of <see cref="HybridAttention"/>.</summary>
internal sealed class HybridDescriptor : SchemeDescriptor
{
    public override string CliName => "hybrid";
    public override IReadOnlyList<AttentionKind> Kinds { get; } = [AttentionKind.Softmax, AttentionKind.Lightning];
    public override string Summary => "2-D: Ulysses inside head groups, a sequence scheme across them";

    public override ShardLayout DefaultLayout(SequenceParallelOptions options) =>
        SchemeRegistry.Get(HybridAttention.SequenceScheme(options)).DefaultLayout(options);

    public override void Validate(AttentionShape shape, SequenceParallelOptions options, int ranks)
    {
        if (options.Attention == AttentionKind.Softmax && !SchemeRegistry.Get(options.HybridSequenceScheme).HybridSequenceScheme)
            throw new ArgumentException($"The hybrid's sequence scheme must be one of {string.Join(", ", SchemeRegistry.All.Where(s => s.HybridSequenceScheme).Select(s => s.Scheme))} for softmax (got {options.HybridSequenceScheme}); set HybridSequenceScheme (--hybrid-scheme).", nameof(options));
        if (ranks < 1) return;
        var valid = Enumerable.Range(1, ranks).Where(d => ranks % d == 0 && shape.Heads % d == 0).ToList();
        int ph = Degree(shape, options, ranks);
        if (ranks % ph != 0 || shape.Heads % ph != 0)
            throw new ArgumentException($"The Ulysses degree Ph = {ph} must divide both P = {ranks} and H = {shape.Heads}; valid choices: {string.Join(", ", valid)}.", "options");
        int sequenceRanks = ranks / ph;
        var layout = options.Layout ?? DefaultLayout(options);
        int chunks = layout == ShardLayout.Zigzag ? 2 * sequenceRanks : sequenceRanks;
        if (shape.SeqLen < chunks) return; // the shared chunk check names this
        int fewest = Sharding.AllRanges(shape.SeqLen, sequenceRanks, layout).Min(r => r.Sum(x => x.Count));
        if (fewest < ph)
            throw new ArgumentException($"Each head group holds as few as {fewest} tokens, fewer than its {ph} ranks; use a longer sequence or a smaller UlyssesDegree.", "shape");
    }

    public override int SequenceRanks(AttentionShape shape, SequenceParallelOptions options, int ranks)
    {
        int ph = Degree(shape, options, ranks);
        return ranks % ph == 0 ? ranks / ph : ranks;
    }

    private static int Degree(AttentionShape shape, SequenceParallelOptions options, int ranks) =>
        options.UlyssesDegree > 0 ? options.UlyssesDegree : Enumerable.Range(1, ranks).Where(d => ranks % d == 0 && shape.Heads % d == 0).Max();

    public override IScheme Create(SchemeSetup s) => new HybridAttention(s);

    public override MemoryEstimate Estimate(AttentionShape shape, SequenceParallelOptions options, int ranks, ShardLayout layout)
    {
        // The head group's tensors, its shuffle, and the sequence scheme on them.
        var z = new EstimateSizes(shape, ranks, layout);
        int p = ranks;
        int ph = options.UlyssesDegree > 0 ? options.UlyssesDegree : Enumerable.Range(1, p).Where(x => p % x == 0 && shape.Heads % x == 0).DefaultIfEmpty(1).Max();
        if (p % ph != 0 || shape.Heads % ph != 0) ph = 1;
        int ps = p / ph;
        int hl = shape.Heads / ph, kvl = shape.KvHeads % ph != 0 ? hl : shape.KvHeads / ph;
        var innerOptions = options with { Scheme = HybridAttention.SequenceScheme(options) };
        var inner = MemoryEstimate.For(shape with { Heads = hl, KvHeads = kvl }, innerOptions, ps, layout);
        long groupT = (z.N + ps - 1) / ps + 1;
        long block = z.B * ((groupT + ph - 1) / ph) * (hl * z.D + kvl * z.D + kvl * z.Dv);
        long scheme = inner.CallerFloats + inner.SchemeFloats;
        long staging = inner.StagingFloats + 2 * block * ph + z.B * z.T * Math.Max(z.QRow, z.ORow);
        return new MemoryEstimate(z.Caller, scheme, staging, Math.Max(inner.LargestSingleFloats, block * ph));
    }
}
