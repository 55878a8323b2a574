using Distributed.Cluster;
using Distributed.Kernels;

namespace Distributed.Schemes;

/// <summary>
/// Ulysses (DeepSpeed-Ulysses) head parallelism: <b>one all-to-all</b> turns sequence shards
/// <c>[B, Nloc, H, ·]</c> of Q, K and V into head shards <c>[B, N, H/P, ·]</c>; each rank runs full attention
/// (flash or lightning, with its heads' decays) over the whole sequence for its heads; one all-to-all
/// brings O back. Backward mirrors it: one all-to-all of dO, local backward, one all-to-all of dQ, dK, dV.
/// Needs <c>H % P == 0</c>; when <c>Hk % P != 0</c> the KV heads are replicated to H heads (and their
/// gradients summed back). Bytes per rank grow as N/P.
/// </summary>
internal sealed class UlyssesAttention : IScheme
{
    private readonly ICommunicator _comm;
    private readonly IKernelBackend _backend;
    private readonly AttentionShape _s;
    private readonly PhaseClock _clock;
    private readonly SequenceParallelOptions _options;
    private readonly IReadOnlyList<(int Start, int Count)>[] _rankRanges;
    private readonly int _p, _hl, _kvHeads, _kvl, _kvGroup;
    private readonly float[] _decay;
    private readonly DeviceTensor _q, _k, _v, _o, _lse, _drow, _dO, _dQ, _dK, _dV;
    private readonly HeadShuffle _shuffle;

    public UlyssesAttention(ICommunicator comm, IKernelBackend backend, AttentionShape shape, SequenceParallelOptions options, ShardLayout layout, PhaseClock clock)
    {
        _p = comm.Size;
        if (shape.Heads % _p != 0)
            throw new ArgumentException($"Ulysses splits heads over ranks and needs H % P == 0, but H = {shape.Heads} and P = {_p}. Use a head count divisible by {_p}, {Divisors(shape.Heads, _p)} ranks, or the hybrid scheme.", nameof(shape));
        _comm = comm;
        _backend = backend;
        _s = shape;
        _clock = clock;
        _options = options;
        _rankRanges = Sharding.AllRanges(shape.SeqLen, _p, layout);
        Ranges = _rankRanges[comm.Rank];
        _hl = shape.Heads / _p;
        // KV heads that do not split evenly are replicated to one per query head.
        _kvHeads = shape.KvHeads % _p == 0 ? shape.KvHeads : shape.Heads;
        _kvGroup = shape.Heads / shape.KvHeads;
        _kvl = _kvHeads / _p;
        _shuffle = new HeadShuffle(comm, clock, shape.Batch, shape.SeqLen, _rankRanges, _kvGroup);
        _decay = (options.Decay ?? Enumerable.Repeat(1f, shape.Heads).ToArray()).Skip(comm.Rank * _hl).Take(_hl).ToArray();
        int b = shape.Batch, n = shape.SeqLen;
        _q = backend.Allocate(b, n, _hl, shape.HeadDim);
        _k = backend.Allocate(b, n, _kvl, shape.HeadDim);
        _v = backend.Allocate(b, n, _kvl, shape.ValueDim);
        _o = backend.Allocate(b, n, _hl, shape.ValueDim);
        _lse = backend.Allocate(b, _hl, n);
        _drow = backend.Allocate(b, _hl, n);
        _dO = backend.Allocate(b, n, _hl, shape.ValueDim);
        _dQ = backend.Allocate(b, n, _hl, shape.HeadDim);
        _dK = backend.Allocate(b, n, _kvl, shape.HeadDim);
        _dV = backend.Allocate(b, n, _kvl, shape.ValueDim);
    }

    public IReadOnlyList<(int Start, int Count)> Ranges { get; }

    private static string Divisors(int heads, int p) =>
        string.Join(" or ", Enumerable.Range(1, p).Where(d => heads % d == 0).Reverse().Take(3));

    public void Forward(DeviceTensor q, DeviceTensor k, DeviceTensor v, DeviceTensor o)
    {
        bool expand = _kvHeads != _s.KvHeads;
        _shuffle.ToHeads([
            new HeadPart(q, _s.Heads, _q, _s.HeadDim, false),
            new HeadPart(k, _s.KvHeads, _k, _s.HeadDim, expand),
            new HeadPart(v, _s.KvHeads, _v, _s.ValueDim, expand)]);
        _clock.Compute(() =>
        {
            if (_options.Attention == AttentionKind.Softmax)
                _backend.FlashForward(_q, _k, _v, _o, _lse, new FlashOptions(0, 0, _options.Causal, _options.Scale));
            else
                _backend.LightningForward(_q, _k, _v, _decay, _options.Causal, null, _o, null);
        });
        _shuffle.ToSequence([new HeadPart(o, _s.Heads, _o, _s.ValueDim, false)]);
    }

    public void Backward(DeviceTensor dO, DeviceTensor dQ, DeviceTensor dK, DeviceTensor dV)
    {
        _shuffle.ToHeads([new HeadPart(dO, _s.Heads, _dO, _s.ValueDim, false)]);
        _clock.Compute(() =>
        {
            if (_options.Attention == AttentionKind.Softmax)
            {
                _backend.SoftmaxRowDot(_o, _dO, _drow);
                _backend.FlashBackward(_q, _k, _v, _lse, _drow, _dO, _dQ, _dK, _dV, new FlashOptions(0, 0, _options.Causal, _options.Scale));
            }
            else
                _backend.LightningBackward(_q, _k, _v, _decay, _options.Causal, null, _dO, null, _dQ, _dK, _dV, null);
        });
        bool expand = _kvHeads != _s.KvHeads;
        _shuffle.ToSequence([
            new HeadPart(dQ, _s.Heads, _dQ, _s.HeadDim, false),
            new HeadPart(dK, _s.KvHeads, _dK, _s.HeadDim, expand),
            new HeadPart(dV, _s.KvHeads, _dV, _s.ValueDim, expand)]);
    }

    /// <summary>Collective: the head-sharded LSE <c>[B, H/P, N]</c> goes back to sequence shards <c>[B, H, Nloc]</c>.</summary>
    public void CopyLse(DeviceTensor lse)
    {
        if (_options.Attention != AttentionKind.Softmax) throw new NotSupportedException("LSE exists for softmax attention only.");
        _shuffle.LseToSequence(_backend, _lse, lse, _s.Heads);
    }

    public void Dispose()
    {
        foreach (var t in new[] { _q, _k, _v, _o, _lse, _drow, _dO, _dQ, _dK, _dV }) t.Dispose();
    }
}

/// <summary>Registration of <see cref="UlyssesAttention"/>.</summary>
internal sealed class UlyssesDescriptor : SchemeDescriptor
{
    public override string CliName => "ulysses";
    public override IReadOnlyList<AttentionKind> Kinds { get; } = [AttentionKind.Softmax, AttentionKind.Lightning];
    public override string Summary => "Ulysses: all-to-all from sequence shards to head shards and back";
    public override ShardLayout DefaultLayout(SequenceParallelOptions options) => ShardLayout.Contiguous;

    public override void Validate(AttentionShape shape, SequenceParallelOptions options, int ranks)
    {
        if (ranks > 0 && shape.Heads % ranks != 0)
            throw new ArgumentException($"Ulysses splits heads over ranks and needs H % P == 0, but H = {shape.Heads} and P = {ranks}. Use a head count divisible by {ranks}, or P = {InputChecks.DivisorsText(shape.Heads, ranks)} ranks, or the Hybrid scheme.", "shape");
    }

    public override IScheme Create(SchemeSetup s) => new UlyssesAttention(s.Communicator, s.Backend, s.Shape, s.Options, s.Layout, s.Clock);

    public override MemoryEstimate Estimate(AttentionShape shape, SequenceParallelOptions options, int ranks, ShardLayout layout)
    {
        var z = new EstimateSizes(shape, ranks, layout);
        long b = z.B, n = z.N, h = z.H, hk = z.Hk, d = z.D, dv = z.Dv, t = z.T;
        long hl = h / ranks, kvl = (hk % ranks == 0 ? hk : h) / ranks;
        long scheme = b * n * (2 * hl * d + 2 * kvl * d + 2 * kvl * dv + 2 * hl * dv) + 2 * b * hl * n;
        long block = b * t * (hl * d + kvl * d + kvl * dv);
        long staging = 2 * block * ranks + b * t * Math.Max(z.QRow, Math.Max(z.ORow, Math.Max(z.KRow, z.VRow)));
        long largest = Math.Max(block * ranks, b * n * Math.Max(hl * Math.Max(d, dv), kvl * Math.Max(d, dv)));
        return new MemoryEstimate(z.Caller, scheme, staging, largest);
    }
}
