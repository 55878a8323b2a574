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
    private readonly int[] _tokens;
    private readonly int _maxTokens, _p, _hl, _kvHeads, _kvl, _kvGroup;
    private readonly float[] _decay;
    private readonly DeviceTensor _q, _k, _v, _o, _lse, _drow, _dO, _dQ, _dK, _dV;
    private float[] _send = [], _receive = [];

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
        _rankRanges = Enumerable.Range(0, _p).Select(r => Sharding.Ranges(shape.SeqLen, _p, r, layout)).ToArray();
        _tokens = _rankRanges.Select(rs => rs.Sum(x => x.Count)).ToArray();
        _maxTokens = _tokens.Max();
        Ranges = _rankRanges[comm.Rank];
        _hl = shape.Heads / _p;
        // KV heads that do not split evenly are replicated to one per query head.
        _kvHeads = shape.KvHeads % _p == 0 ? shape.KvHeads : shape.Heads;
        _kvGroup = shape.Heads / shape.KvHeads;
        _kvl = _kvHeads / _p;
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

    /// <summary>A tensor that moves: its local (sequence-sharded) and head-sharded forms.</summary>
    private readonly record struct Part(DeviceTensor Local, int LocalHeads, DeviceTensor Heads, int Width, bool Expand);

    public void Forward(DeviceTensor q, DeviceTensor k, DeviceTensor v, DeviceTensor o)
    {
        bool expand = _kvHeads != _s.KvHeads;
        ToHeads([
            new Part(q, _s.Heads, _q, _s.HeadDim, false),
            new Part(k, _s.KvHeads, _k, _s.HeadDim, expand),
            new Part(v, _s.KvHeads, _v, _s.ValueDim, expand)]);
        _clock.Compute(() =>
        {
            if (_options.Attention == AttentionKind.Softmax)
                _backend.FlashForward(_q, _k, _v, _o, _lse, new FlashOptions(0, 0, _options.Causal, _options.Scale));
            else
                _backend.LightningForward(_q, _k, _v, _decay, _options.Causal, null, _o, null);
        });
        ToSequence([new Part(o, _s.Heads, _o, _s.ValueDim, false)]);
    }

    public void Backward(DeviceTensor dO, DeviceTensor dQ, DeviceTensor dK, DeviceTensor dV)
    {
        ToHeads([new Part(dO, _s.Heads, _dO, _s.ValueDim, false)]);
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
        ToSequence([
            new Part(dQ, _s.Heads, _dQ, _s.HeadDim, false),
            new Part(dK, _s.KvHeads, _dK, _s.HeadDim, expand),
            new Part(dV, _s.KvHeads, _dV, _s.ValueDim, expand)]);
    }

    /// <summary>One all-to-all: block s of every rank carries its tokens of rank s's heads, for every part.</summary>
    private void ToHeads(Part[] parts)
    {
        _clock.Communicate(() =>
        {
            int b = _s.Batch, mine = _tokens[_comm.Rank];
            int block = parts.Sum(pt => b * _maxTokens * HeadsPerRank(pt) * pt.Width);
            Grow(ref _send, (long)block * _p);
            Grow(ref _receive, (long)block * _p);
            int partOffset = 0;
            foreach (var pt in parts)
            {
                var local = new float[pt.Local.Length];
                pt.Local.CopyToHost(local);
                int hs = HeadsPerRank(pt), w = pt.Width;
                for (int s = 0; s < _p; s++)
                {
                    int dst = s * block + partOffset;
                    for (int bb = 0; bb < b; bb++)
                        for (int t = 0; t < mine; t++)
                            for (int h = 0; h < hs; h++)
                            {
                                int gh = s * hs + h, src = pt.Expand ? gh / _kvGroup : gh;
                                local.AsSpan(((bb * mine + t) * pt.LocalHeads + src) * w, w)
                                    .CopyTo(_send.AsSpan(dst + ((bb * _maxTokens + t) * hs + h) * w, w));
                            }
                }
                partOffset += b * _maxTokens * hs * w;
            }
            _comm.AllToAll(_send.AsSpan(0, block * _p), _receive.AsSpan(0, block * _p));
            partOffset = 0;
            foreach (var pt in parts)
            {
                int hs = HeadsPerRank(pt), w = pt.Width, row = hs * w;
                var global = new float[(long)b * _s.SeqLen * row];
                for (int r = 0; r < _p; r++)
                {
                    int t = _tokens[r];
                    var blockRows = new float[(long)b * t * row];
                    for (int bb = 0; bb < b; bb++)
                        _receive.AsSpan(r * block + partOffset + bb * _maxTokens * row, t * row).CopyTo(blockRows.AsSpan(bb * t * row, t * row));
                    Sharding.PutLocal(blockRows, global, b, _s.SeqLen, row, _rankRanges[r]);
                }
                pt.Heads.CopyFromHost(global);
                partOffset += b * _maxTokens * row;
            }
        });
    }

    /// <summary>The inverse: one all-to-all back to sequence shards (replicated KV gradients summed back).</summary>
    private void ToSequence(Part[] parts)
    {
        _clock.Communicate(() =>
        {
            int b = _s.Batch, mine = _tokens[_comm.Rank];
            int block = parts.Sum(pt => b * _maxTokens * HeadsPerRank(pt) * pt.Width);
            Grow(ref _send, (long)block * _p);
            Grow(ref _receive, (long)block * _p);
            int partOffset = 0;
            foreach (var pt in parts)
            {
                int hs = HeadsPerRank(pt), w = pt.Width, row = hs * w;
                var global = new float[pt.Heads.Length];
                pt.Heads.CopyToHost(global);
                for (int r = 0; r < _p; r++)
                {
                    int t = _tokens[r];
                    var rows = new float[(long)b * t * row];
                    Sharding.TakeLocal(global, rows, b, _s.SeqLen, row, _rankRanges[r]);
                    for (int bb = 0; bb < b; bb++)
                        rows.AsSpan(bb * t * row, t * row).CopyTo(_send.AsSpan(r * block + partOffset + bb * _maxTokens * row, t * row));
                }
                partOffset += b * _maxTokens * row;
            }
            _comm.AllToAll(_send.AsSpan(0, block * _p), _receive.AsSpan(0, block * _p));
            partOffset = 0;
            foreach (var pt in parts)
            {
                int hs = HeadsPerRank(pt), w = pt.Width;
                var local = new float[pt.Local.Length];
                for (int s = 0; s < _p; s++)
                    for (int bb = 0; bb < b; bb++)
                        for (int t = 0; t < mine; t++)
                            for (int h = 0; h < hs; h++)
                            {
                                int gh = s * hs + h, dst = pt.Expand ? gh / _kvGroup : gh;
                                var from = _receive.AsSpan(s * block + partOffset + ((bb * _maxTokens + t) * hs + h) * w, w);
                                var to = local.AsSpan(((bb * mine + t) * pt.LocalHeads + dst) * w, w);
                                if (pt.Expand) for (int e = 0; e < w; e++) to[e] += from[e];
                                else from.CopyTo(to);
                            }
                pt.Local.CopyFromHost(local);
                partOffset += b * _maxTokens * hs * w;
            }
        });
    }

    private int HeadsPerRank(Part pt) => pt.Heads.Shape[2];

    private static void Grow(ref float[] buffer, long length)
    {
        if (buffer.Length < length) buffer = new float[length];
    }

    public void Dispose()
    {
        foreach (var t in new[] { _q, _k, _v, _o, _lse, _drow, _dO, _dQ, _dK, _dV }) t.Dispose();
    }
}
