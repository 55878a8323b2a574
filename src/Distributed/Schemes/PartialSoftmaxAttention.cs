using Distributed.Cluster;
using Distributed.Kernels;

namespace Distributed.Schemes;

/// <summary>
/// Partial softmax states: K and V never move. Forward: <b>one all-gather of Q</b>; each rank computes the
/// partial state (O_r, LSE_r) of every query against its own KV shard; <b>one all-to-all</b> hands each rank
/// the partials of its own queries from every rank (rather than all-gathering every partial to everyone),
/// merged with MergeSoftmax in rank order. Backward: one all-gather of [dO | LSE | Drow], each rank's dK/dV
/// are complete locally, and one reduce-scatter returns dQ to the query owners. The bytes depend on the
/// number of queries, not on the KV length: with few queries (decode, see <see cref="Decode"/>) they are tiny.
/// </summary>
internal sealed class PartialSoftmaxAttention : IScheme
{
    private readonly ICommunicator _comm;
    private readonly IKernelBackend _backend;
    private readonly AttentionShape _s;
    private readonly PhaseClock _clock;
    private readonly FlashOptions _options;
    private readonly IReadOnlyList<(int Start, int Count)>[] _rankRanges;
    private readonly int[] _tokens;
    private readonly int _maxTokens, _qRow, _oRow;
    private readonly LocalChunks _local;
    private readonly DeviceTensor _qAll, _oPart, _lsePart, _oTmp, _lseTmp, _oMine, _lseMine, _drowMine, _dOAll, _lseAll, _drowAll, _dQAll, _oReceived, _lseReceived;
    private float[] _a = [], _b = [], _c = [];  // this rank's rows; every rank's gathered rows; all-to-all / reduce-scatter
    private DeviceTensor[]? _k, _v;

    public PartialSoftmaxAttention(ICommunicator comm, IKernelBackend backend, AttentionShape shape, SequenceParallelOptions options, ShardLayout layout, PhaseClock clock)
    {
        _comm = comm;
        _backend = backend;
        _s = shape;
        _clock = clock;
        _options = new FlashOptions(0, 0, options.Causal, options.Scale);
        _rankRanges = Sharding.AllRanges(shape.SeqLen, comm.Size, layout);
        _tokens = Sharding.TokenCounts(_rankRanges);
        _maxTokens = _tokens.Max();
        Ranges = _rankRanges[comm.Rank];
        _local = new LocalChunks(backend, Ranges);
        _qRow = shape.Heads * shape.HeadDim;
        _oRow = shape.Heads * shape.ValueDim;
        int b = shape.Batch, n = shape.SeqLen, h = shape.Heads, mine = _tokens[comm.Rank];
        _qAll = backend.Allocate(b, n, h, shape.HeadDim);
        _oPart = backend.Allocate(b, n, h, shape.ValueDim);
        _lsePart = backend.Allocate(b, h, n);
        _oTmp = backend.Allocate(b, n, h, shape.ValueDim);
        _lseTmp = backend.Allocate(b, h, n);
        _oMine = backend.Allocate(b, mine, h, shape.ValueDim);
        _lseMine = backend.Allocate(b, h, mine);
        _drowMine = backend.Allocate(b, h, mine);
        _oReceived = backend.Allocate(b, mine, h, shape.ValueDim);
        _lseReceived = backend.Allocate(b, h, mine);
        _dOAll = backend.Allocate(b, n, h, shape.ValueDim);
        _lseAll = backend.Allocate(b, h, n);
        _drowAll = backend.Allocate(b, h, n);
        _dQAll = backend.Allocate(b, n, h, shape.HeadDim);
    }

    public IReadOnlyList<(int Start, int Count)> Ranges { get; }

    public void Forward(DeviceTensor q, DeviceTensor k, DeviceTensor v, DeviceTensor o)
    {
        int b = _s.Batch, n = _s.SeqLen, h = _s.Heads;
        GatherRows([(q, _qRow)], [(_qAll, _qRow)]);
        _clock.Compute(() =>
        {
            _k = _local.Split("k", k);
            _v = _local.Split("v", v);
            for (int c = 0; c < Ranges.Count; c++)
            {
                var (oDst, lseDst) = c == 0 ? (_oPart, _lsePart) : (_oTmp, _lseTmp);
                _backend.FlashForward(_qAll, _k[c], _v[c], oDst, lseDst, _options with { KeyOffset = Ranges[c].Start });
                if (c > 0) _backend.MergeSoftmax(_oPart, _lsePart, _oTmp, _lseTmp);
            }
        });
        // All-to-all: block s carries [O | LSE] of rank s's queries; each rank merges what it receives in rank order.
        _clock.Communicate(() =>
        {
            int oBlock = b * _maxTokens * _oRow, lBlock = b * h * _maxTokens, block = oBlock + lBlock;
            HostBuffer.Grow(ref _c, 2L * block * _comm.Size);
            var send = _c.AsSpan(0, block * _comm.Size);
            for (int s = 0; s < _comm.Size; s++)
            {
                int t = _tokens[s];
                TakeRows(_oPart, b, _oRow, s, send.Slice(s * block, b * t * _oRow));
                TakeRows(_lsePart, b * h, 1, s, send.Slice(s * block + oBlock, b * h * t));
            }
            var receive = _c.AsSpan(block * _comm.Size, block * _comm.Size);
            _comm.AllToAll(send, receive);
            int mine = _tokens[_comm.Rank];
            // Rank 0's partial starts the state; every other rank's is merged into it, in rank order.
            _oMine.CopyFromHost(receive.Slice(0, b * mine * _oRow));
            _lseMine.CopyFromHost(receive.Slice(oBlock, b * h * mine));
            for (int r = 1; r < _comm.Size; r++)
            {
                _oReceived.CopyFromHost(receive.Slice(r * block, b * mine * _oRow));
                _lseReceived.CopyFromHost(receive.Slice(r * block + oBlock, b * h * mine));
                _backend.MergeSoftmax(_oMine, _lseMine, _oReceived, _lseReceived);
            }
        });
        _clock.Compute(() => _backend.CopySlice(_oMine, 0, o, 0, _tokens[_comm.Rank], 1));
    }

    public void Backward(DeviceTensor dO, DeviceTensor dQ, DeviceTensor dK, DeviceTensor dV)
    {
        if (_k is null || _v is null) throw new InvalidOperationException("Call Forward before Backward: the backward pass reuses the forward's queries and LSE.");
        int b = _s.Batch, n = _s.SeqLen, h = _s.Heads;
        _clock.Compute(() => _backend.SoftmaxRowDot(_oMine, dO, _drowMine));
        GatherRows([(dO, _oRow)], [(_dOAll, _oRow)], [_lseMine, _drowMine], [_lseAll, _drowAll]);
        _clock.Compute(() =>
        {
            // Everything accumulates from zero: dQ over this rank's KV ranges, dK/dV per range.
            var dKs = _local.Output("dK", dK);
            var dVs = _local.Output("dV", dV);
            _backend.Clear(_dQAll);
            for (int c = 0; c < Ranges.Count; c++)
            {
                _backend.Clear(dKs[c]);
                _backend.Clear(dVs[c]);
                _backend.FlashBackward(_qAll, _k[c], _v[c], _lseAll, _drowAll, _dOAll, _dQAll, dKs[c], dVs[c],
                    _options with { KeyOffset = Ranges[c].Start, Accumulate = true });
            }
            _local.Join(dKs, dK);
            _local.Join(dVs, dV);
        });
        // One reduce-scatter: rank s receives Σ_r of the dQ rows of its own queries.
        _clock.Communicate(() =>
        {
            int block = b * _maxTokens * _qRow;
            HostBuffer.Grow(ref _c, (long)block * (_comm.Size + 1));
            var send = _c.AsSpan(0, block * _comm.Size);
            send.Clear();
            for (int s = 0; s < _comm.Size; s++)
                TakeRows(_dQAll, b, _qRow, s, send.Slice(s * block, b * _tokens[s] * _qRow));
            var receive = _c.AsSpan(block * _comm.Size, block);
            _comm.ReduceScatterSum(send, receive);
            dQ.CopyFromHost(receive.Slice(0, b * _tokens[_comm.Rank] * _qRow));
        });
    }

    /// <summary>
    /// One all-gather of this rank's rows of several tensors (token-major ones, and [B,H,Nloc] row statistics),
    /// rebuilt in global token order on the device.
    /// </summary>
    private void GatherRows((DeviceTensor Local, int Row)[] rows, (DeviceTensor Global, int Row)[] globals, DeviceTensor[]? stats = null, DeviceTensor[]? globalStats = null)
    {
        _clock.Communicate(() =>
        {
            int b = _s.Batch, n = _s.SeqLen, h = _s.Heads;
            int statCount = stats?.Length ?? 0;
            int PerRank(int t) => rows.Sum(x => b * t * x.Row) + statCount * b * h * t;
            var counts = _tokens.Select(PerRank).ToArray();
            int mine = _tokens[_comm.Rank];
            HostBuffer.Grow(ref _a, counts[_comm.Rank]);
            int off = 0;
            foreach (var (local, row) in rows) { local.CopyToHost(_a.AsSpan(off, b * mine * row)); off += b * mine * row; }
            for (int i = 0; i < statCount; i++) { stats![i].CopyToHost(_a.AsSpan(off, b * h * mine)); off += b * h * mine; }
            HostBuffer.Grow(ref _b, counts.Sum(x => (long)x));
            _comm.AllGatherVariable(_a.AsSpan(0, counts[_comm.Rank]), _b.AsSpan(0, counts.Sum()), counts);
            for (int g = 0; g < rows.Length + statCount; g++)
            {
                bool stat = g >= rows.Length;
                int row = stat ? 1 : rows[g].Row, batch = stat ? b * h : b;
                var target = stat ? globalStats![g - rows.Length] : globals[g].Global;
                int rankOffset = 0;
                for (int r = 0; r < _comm.Size; r++)
                {
                    int t = _tokens[r], inner = 0;
                    for (int x = 0; x < g; x++) inner += x < rows.Length ? b * t * rows[x].Row : b * h * t;
                    PutRows(_b.AsSpan(rankOffset + inner, batch * t * row), target, batch, row, r);
                    rankOffset += counts[r];
                }
            }
        });
    }


    /// <summary>Rank r's rows of a global <c>[batch, N, row]</c> device tensor, in r's local order, into <paramref name="local"/>.</summary>
    private void TakeRows(DeviceTensor global, int batch, int row, int r, Span<float> local)
    {
        foreach (var seg in Sharding.Segments(batch, _s.SeqLen, row, _rankRanges[r]))
            global.CopyToHost(local.Slice((int)seg.LocalOffset, (int)seg.Length), seg.GlobalOffset);
    }

    /// <summary>The inverse of <see cref="TakeRows"/>: rank r's local rows to their places in a global device tensor.</summary>
    private void PutRows(ReadOnlySpan<float> local, DeviceTensor global, int batch, int row, int r)
    {
        foreach (var seg in Sharding.Segments(batch, _s.SeqLen, row, _rankRanges[r]))
            global.CopyFromHost(local.Slice((int)seg.LocalOffset, (int)seg.Length), seg.GlobalOffset);
    }

    /// <summary>
    /// One decode step against a KV cache sharded over ranks: q <c>[B, Nq, H, D]</c> is the same on every rank
    /// (new tokens at global positions <paramref name="queryPosition"/>…), kLocal/vLocal are this rank's
    /// cache shard <c>[B, Nkv_r, Hk, D|Dv]</c> starting at global position <paramref name="kvStart"/>. Each
    /// rank computes its partial (O, LSE), one all-gather moves the partials (B·Nq·H·(Dv+1) floats per
    /// rank, whatever the cache length), and every rank merges them in rank order into o <c>[B, Nq, H, Dv]</c>.
    /// </summary>
    public static void Decode(ICommunicator comm, IKernelBackend backend, DeviceTensor q, long queryPosition, DeviceTensor kLocal, DeviceTensor vLocal,
        long kvStart, DeviceTensor o, bool causal, float scale)
    {
        int b = q.Shape[0], nq = q.Shape[1], h = q.Shape[2], dv = vLocal.Shape[3];
        using var lse = backend.Allocate(b, h, nq);
        backend.FlashForward(q, kLocal, vLocal, o, lse, new FlashOptions(queryPosition, kvStart, causal, scale));
        int oLen = b * nq * h * dv, lLen = b * h * nq;
        var send = new float[oLen + lLen];
        o.CopyToHost(send.AsSpan(0, oLen));
        lse.CopyToHost(send.AsSpan(oLen, lLen));
        var all = new float[send.Length * comm.Size];
        comm.AllGather(send, all);
        using var oR = backend.Allocate(b, nq, h, dv);
        using var lR = backend.Allocate(b, h, nq);
        o.CopyFromHost(all.AsSpan(0, oLen));
        lse.CopyFromHost(all.AsSpan(oLen, lLen));
        for (int r = 1; r < comm.Size; r++)
        {
            oR.CopyFromHost(all.AsSpan(r * send.Length, oLen));
            lR.CopyFromHost(all.AsSpan(r * send.Length + oLen, lLen));
            backend.MergeSoftmax(o, lse, oR, lR);
        }
    }

    public void CopyLse(DeviceTensor lse) => _backend.CopySlice(_lseMine, 0, lse, 0, _tokens[_comm.Rank], 2);

    public void Dispose()
    {
        foreach (var t in new[] { _qAll, _oPart, _lsePart, _oTmp, _lseTmp, _oMine, _lseMine, _drowMine, _dOAll, _lseAll, _drowAll, _dQAll, _oReceived, _lseReceived }) t.Dispose();
        _local.Dispose();
    }
}

/// <summary>Registration of <see cref="PartialSoftmaxAttention"/>.</summary>
internal sealed class PartialSoftmaxDescriptor : SchemeDescriptor
{
    public override string CliName => "partial";
    public override IReadOnlyList<AttentionKind> Kinds { get; } = [AttentionKind.Softmax];
    public override string Summary => "partial softmax states: KV stays sharded, Q and the (O, LSE) partials move";
    public override bool HybridSequenceScheme => true;
    public override ShardLayout DefaultLayout(SequenceParallelOptions options) => ShardLayout.Contiguous;
    public override IScheme Create(SchemeSetup s) => new PartialSoftmaxAttention(s.Communicator, s.Backend, s.Shape, s.Options, s.Layout, s.Clock);

    public override MemoryEstimate Estimate(AttentionShape shape, SequenceParallelOptions options, int ranks, ShardLayout layout)
    {
        var z = new EstimateSizes(shape, ranks, layout);
        long b = z.B, n = z.N, h = z.H, t = z.T, kRow = z.KRow, vRow = z.VRow, qRow = z.QRow, oRow = z.ORow;
        long scheme = b * n * (2 * qRow + 3 * oRow) + 4 * b * h * n + b * t * 2 * oRow + 3 * b * h * t
            + (z.CopiedParts ? b * t * 2 * (kRow + vRow) : 0);
        long block = b * t * (oRow + h);
        long staging = b * t * (oRow + 2 * h) + b * n * Math.Max(qRow, oRow + 2 * h) + Math.Max(2 * block * ranks, b * t * qRow * (ranks + 1));
        long largest = Math.Max(b * n * Math.Max(qRow + 2 * h, oRow + 2 * h), 2 * block * ranks);
        return new MemoryEstimate(z.Caller, scheme, staging, largest);
    }
}
