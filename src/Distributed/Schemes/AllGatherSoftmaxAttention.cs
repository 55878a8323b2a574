using Distributed.Cluster;
using Distributed.Kernels;

namespace Distributed.Schemes;

/// <summary>
/// All-gather KV for softmax attention (LASP-2H, Llama-3 context parallel). Forward: <b>one all-gather</b>
/// of every rank's K and V (packed together), then each local query chunk attends to the whole sequence
/// with its global offset (causal masking skips the future). Backward: each rank computes dK and dV over
/// the whole sequence for its queries, and <b>one reduce-scatter</b> returns every rank's share to its owner.
/// Zigzag sharding balances causal work. Bytes grow linearly with N.
/// </summary>
internal sealed class AllGatherSoftmaxAttention : IScheme
{
    private readonly ICommunicator _comm;
    private readonly IKernelBackend _backend;
    private readonly AttentionShape _s;
    private readonly PhaseClock _clock;
    private readonly FlashOptions _options;
    private readonly IReadOnlyList<(int Start, int Count)>[] _rankRanges;
    private readonly int[] _rankTokens;
    private readonly LocalChunks _local;
    private readonly int _kRow, _vRow;
    private readonly DeviceTensor _k, _v, _dK, _dV;
    private readonly DeviceTensor[] _lse, _drow;
    private float[] _kvSend = [], _kvGathered = [], _kGlobal = [], _vGlobal = [], _scatterSend = [], _scatterReceive = [];
    private DeviceTensor[]? _q, _o;

    public AllGatherSoftmaxAttention(ICommunicator comm, IKernelBackend backend, AttentionShape shape, SequenceParallelOptions options, ShardLayout layout, PhaseClock clock)
    {
        _comm = comm;
        _backend = backend;
        _s = shape;
        _clock = clock;
        _options = new FlashOptions(0, 0, options.Causal, options.Scale);
        _rankRanges = Sharding.AllRanges(shape.SeqLen, comm.Size, layout);
        _rankTokens = Sharding.TokenCounts(_rankRanges);
        Ranges = _rankRanges[comm.Rank];
        _local = new LocalChunks(backend, Ranges);
        _kRow = shape.KvHeads * shape.HeadDim;
        _vRow = shape.KvHeads * shape.ValueDim;
        _k = backend.Allocate(shape.Batch, shape.SeqLen, shape.KvHeads, shape.HeadDim);
        _v = backend.Allocate(shape.Batch, shape.SeqLen, shape.KvHeads, shape.ValueDim);
        _dK = backend.Allocate(shape.Batch, shape.SeqLen, shape.KvHeads, shape.HeadDim);
        _dV = backend.Allocate(shape.Batch, shape.SeqLen, shape.KvHeads, shape.ValueDim);
        _lse = Ranges.Select(r => backend.Allocate(shape.Batch, shape.Heads, r.Count)).ToArray();
        _drow = Ranges.Select(r => backend.Allocate(shape.Batch, shape.Heads, r.Count)).ToArray();
    }

    public IReadOnlyList<(int Start, int Count)> Ranges { get; }

    public void Forward(DeviceTensor q, DeviceTensor k, DeviceTensor v, DeviceTensor o)
    {
        GatherKeysAndValues(k, v);
        _clock.Compute(() =>
        {
            var qs = _local.Split("q", q);
            var os = _local.Output("o", o);
            for (int c = 0; c < Ranges.Count; c++)
                _backend.FlashForward(qs[c], _k, _v, os[c], _lse[c], _options with { QueryOffset = Ranges[c].Start });
            _local.Join(os, o);
            (_q, _o) = (qs, os);
        });
    }

    public void Backward(DeviceTensor dO, DeviceTensor dQ, DeviceTensor dK, DeviceTensor dV)
    {
        if (_q is null || _o is null) throw new InvalidOperationException("Call Forward before Backward: the backward pass reuses the forward's gathered K/V, output and LSE.");
        _clock.Compute(() =>
        {
            var dOs = _local.Split("dO", dO);
            var dQs = _local.Output("dQ", dQ);
            for (int c = 0; c < Ranges.Count; c++)
            {
                _backend.SoftmaxRowDot(_o[c], dOs[c], _drow[c]);
                // Accumulate sums dK and dV over the chunks, but it also adds into dQ: chunk c's dQ part
                // must start at zero, not at the last step's value.
                if (c > 0) _backend.Clear(dQs[c]);
                _backend.FlashBackward(_q[c], _k, _v, _lse[c], _drow[c], dOs[c], dQs[c], _dK, _dV,
                    _options with { QueryOffset = Ranges[c].Start, Accumulate = c > 0 });
            }
            _local.Join(dQs, dQ);
        });
        ScatterGradients(dK, dV);
    }

    /// <summary>One all-gather of [K | V] of every rank, rebuilt in global token order on the device.</summary>
    private void GatherKeysAndValues(DeviceTensor k, DeviceTensor v)
    {
        _clock.Communicate(() =>
        {
            int b = _s.Batch, n = _s.SeqLen;
            int mine = _rankTokens[_comm.Rank];
            HostBuffer.Grow(ref _kvSend, (long)b * mine * (_kRow + _vRow));
            k.CopyToHost(_kvSend.AsSpan(0, b * mine * _kRow));
            v.CopyToHost(_kvSend.AsSpan(b * mine * _kRow, b * mine * _vRow));
            var counts = _rankTokens.Select(t => b * t * (_kRow + _vRow)).ToArray();
            HostBuffer.Grow(ref _kvGathered, counts.Sum(c => (long)c));
            _comm.AllGatherVariable(_kvSend.AsSpan(0, counts[_comm.Rank]), _kvGathered.AsSpan(0, counts.Sum()), counts);
            HostBuffer.Grow(ref _kGlobal, (long)b * n * _kRow);
            HostBuffer.Grow(ref _vGlobal, (long)b * n * _vRow);
            int offset = 0;
            for (int r = 0; r < _comm.Size; r++)
            {
                int t = _rankTokens[r];
                Sharding.PutLocal(_kvGathered.AsSpan(offset, b * t * _kRow), _kGlobal.AsSpan(0, b * n * _kRow), b, n, _kRow, _rankRanges[r]);
                Sharding.PutLocal(_kvGathered.AsSpan(offset + b * t * _kRow, b * t * _vRow), _vGlobal.AsSpan(0, b * n * _vRow), b, n, _vRow, _rankRanges[r]);
                offset += counts[r];
            }
            _k.CopyFromHost(_kGlobal.AsSpan(0, b * n * _kRow));
            _v.CopyFromHost(_vGlobal.AsSpan(0, b * n * _vRow));
        });
    }

    /// <summary>One reduce-scatter of [dK | dV]: rank r receives the sum over ranks of its own rows.</summary>
    private void ScatterGradients(DeviceTensor dK, DeviceTensor dV)
    {
        _clock.Communicate(() =>
        {
            int b = _s.Batch, n = _s.SeqLen;
            int maxTokens = _rankTokens.Max();
            int block = b * maxTokens * (_kRow + _vRow); // equal blocks: shorter shards are zero-padded
            _dK.CopyToHost(_kGlobal.AsSpan(0, b * n * _kRow));
            _dV.CopyToHost(_vGlobal.AsSpan(0, b * n * _vRow));
            HostBuffer.Grow(ref _scatterSend, (long)block * _comm.Size);
            HostBuffer.Grow(ref _scatterReceive, block);
            Array.Clear(_scatterSend, 0, block * _comm.Size);
            for (int r = 0; r < _comm.Size; r++)
            {
                int t = _rankTokens[r];
                Sharding.TakeLocal(_kGlobal.AsSpan(0, b * n * _kRow), _scatterSend.AsSpan(r * block, b * t * _kRow), b, n, _kRow, _rankRanges[r]);
                Sharding.TakeLocal(_vGlobal.AsSpan(0, b * n * _vRow), _scatterSend.AsSpan(r * block + b * t * _kRow, b * t * _vRow), b, n, _vRow, _rankRanges[r]);
            }
            _comm.ReduceScatterSum(_scatterSend.AsSpan(0, block * _comm.Size), _scatterReceive.AsSpan(0, block));
            int mine = _rankTokens[_comm.Rank];
            dK.CopyFromHost(_scatterReceive.AsSpan(0, b * mine * _kRow));
            dV.CopyFromHost(_scatterReceive.AsSpan(b * mine * _kRow, b * mine * _vRow));
        });
    }


    public void CopyLse(DeviceTensor lse)
    {
        int offset = 0;
        for (int c = 0; c < Ranges.Count; c++)
        {
            _backend.CopySlice(_lse[c], 0, lse, offset, Ranges[c].Count, 2);
            offset += Ranges[c].Count;
        }
    }

    public void Dispose()
    {
        _k.Dispose(); _v.Dispose(); _dK.Dispose(); _dV.Dispose();
        foreach (var t in _lse) t.Dispose();
        foreach (var t in _drow) t.Dispose();
        _local.Dispose();
    }
}
