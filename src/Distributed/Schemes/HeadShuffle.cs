using Distributed.Cluster;
using Distributed.Kernels;

namespace Distributed.Schemes;

/// <summary>A tensor that moves between its sequence-sharded form <c>[B, Nloc, LocalHeads, Width]</c> and its
/// head-sharded form <c>[B, N, heads/P, Width]</c>; <c>Expand</c> replicates KV heads to one per query head.</summary>
internal readonly record struct HeadPart(DeviceTensor Local, int LocalHeads, DeviceTensor Heads, int Width, bool Expand);

/// <summary>
/// The Ulysses all-to-all over one communicator: sequence shards (any token ranges per rank, uneven allowed,
/// padded to the longest) to head shards over the whole (sub)sequence, and back. Several tensors travel in
/// one all-to-all. Used by <see cref="UlyssesAttention"/> and, inside head groups, by <see cref="HybridAttention"/>.
/// </summary>
internal sealed class HeadShuffle(ICommunicator comm, PhaseClock clock, int batch, int seqLen, IReadOnlyList<(int Start, int Count)>[] rankRanges, int kvGroup)
{
    private readonly int[] _tokens = Sharding.TokenCounts(rankRanges);
    private readonly int _p = comm.Size;
    private float[] _send = [], _receive = [], _local = [];

    private int MaxTokens => _tokens.Max();

    /// <summary>Floats of one rank's block of an all-to-all of <paramref name="parts"/>, refused past one array.</summary>
    private int Block(HeadPart[] parts)
    {
        long block = parts.Sum(pt => (long)batch * MaxTokens * HeadsPerRank(pt) * pt.Width);
        if (block * _p > Array.MaxLength)
            throw new InvalidOperationException($"One Ulysses all-to-all would move {block * _p} floats per rank, more than one array holds; use more ranks or a shorter sequence.");
        return (int)block;
    }

    /// <summary>One all-to-all: block s of every rank carries its tokens of rank s's heads, for every part.</summary>
    public void ToHeads(HeadPart[] parts)
    {
        clock.Communicate(() =>
        {
            int b = batch, mine = _tokens[comm.Rank];
            int block = Block(parts);
            HostBuffer.Grow(ref _send, (long)block * _p);
            HostBuffer.Grow(ref _receive, (long)block * _p);
            int partOffset = 0;
            foreach (var pt in parts)
            {
                HostBuffer.Grow(ref _local, pt.Local.Length);
                var local = _local.AsSpan(0, (int)pt.Local.Length);
                pt.Local.CopyToHost(local);
                int hs = HeadsPerRank(pt), w = pt.Width;
                for (int s = 0; s < _p; s++)
                {
                    int dst = s * block + partOffset;
                    for (int bb = 0; bb < b; bb++)
                        for (int t = 0; t < mine; t++)
                            for (int h = 0; h < hs; h++)
                            {
                                int gh = s * hs + h, src = pt.Expand ? gh / kvGroup : gh;
                                local.Slice(((bb * mine + t) * pt.LocalHeads + src) * w, w)
                                    .CopyTo(_send.AsSpan(dst + ((bb * MaxTokens + t) * hs + h) * w, w));
                            }
                }
                partOffset += b * MaxTokens * hs * w;
            }
            comm.AllToAll(_send.AsSpan(0, block * _p), _receive.AsSpan(0, block * _p));
            partOffset = 0;
            foreach (var pt in parts)
            {
                int hs = HeadsPerRank(pt), w = pt.Width, row = hs * w;
                // Each rank's rows go straight to their global positions in the head-sharded tensor.
                for (int r = 0; r < _p; r++)
                    foreach (var (local, global, count) in Sharding.LocalToGlobal(rankRanges[r], 0, _tokens[r]))
                        for (int bb = 0; bb < b; bb++)
                            pt.Heads.CopyFromHost(_receive.AsSpan(r * block + partOffset + (bb * MaxTokens + local) * row, count * row),
                                ((long)bb * seqLen + global) * row);
                partOffset += b * MaxTokens * row;
            }
        });
    }

    /// <summary>The inverse: one all-to-all back to sequence shards (replicated KV gradients summed back).</summary>
    public void ToSequence(HeadPart[] parts)
    {
        clock.Communicate(() =>
        {
            int b = batch, mine = _tokens[comm.Rank];
            int block = Block(parts);
            HostBuffer.Grow(ref _send, (long)block * _p);
            HostBuffer.Grow(ref _receive, (long)block * _p);
            int partOffset = 0;
            foreach (var pt in parts)
            {
                int hs = HeadsPerRank(pt), w = pt.Width, row = hs * w;
                // Rank r's rows are read straight from their global positions in the head-sharded tensor.
                for (int r = 0; r < _p; r++)
                    foreach (var (local, global, count) in Sharding.LocalToGlobal(rankRanges[r], 0, _tokens[r]))
                        for (int bb = 0; bb < b; bb++)
                            pt.Heads.CopyToHost(_send.AsSpan(r * block + partOffset + (bb * MaxTokens + local) * row, count * row),
                                ((long)bb * seqLen + global) * row);
                partOffset += b * MaxTokens * row;
            }
            comm.AllToAll(_send.AsSpan(0, block * _p), _receive.AsSpan(0, block * _p));
            partOffset = 0;
            foreach (var pt in parts)
            {
                int hs = HeadsPerRank(pt), w = pt.Width;
                HostBuffer.Grow(ref _local, pt.Local.Length);
                var local = _local.AsSpan(0, (int)pt.Local.Length);
                if (pt.Expand) local.Clear();
                for (int s = 0; s < _p; s++)
                    for (int bb = 0; bb < b; bb++)
                        for (int t = 0; t < mine; t++)
                            for (int h = 0; h < hs; h++)
                            {
                                int gh = s * hs + h, dst = pt.Expand ? gh / kvGroup : gh;
                                var from = _receive.AsSpan(s * block + partOffset + ((bb * MaxTokens + t) * hs + h) * w, w);
                                var to = local.Slice(((bb * mine + t) * pt.LocalHeads + dst) * w, w);
                                if (pt.Expand) for (int e = 0; e < w; e++) to[e] += from[e];
                                else from.CopyTo(to);
                            }
                pt.Local.CopyFromHost(local);
                partOffset += b * MaxTokens * hs * w;
            }
        });
    }

    /// <summary>
    /// Collective: a head-sharded row statistic <paramref name="headLse"/> <c>[B, heads/P, N]</c> back to sequence
    /// shards <paramref name="lse"/> <c>[B, heads, Nloc]</c>, through the same all-to-all as O, seen as
    /// <c>[B, N, heads, 1]</c>.
    /// </summary>
    public void LseToSequence(IKernelBackend backend, DeviceTensor headLse, DeviceTensor lse, int heads)
    {
        int b = batch, hl = headLse.Shape[1], nloc = _tokens[comm.Rank];
        var byHead = new float[headLse.Length];
        headLse.CopyToHost(byHead);
        using var byToken = backend.Allocate(b, seqLen, hl, 1);
        byToken.CopyFromHost(Transpose(byHead, b, hl, seqLen));
        using var local = backend.Allocate(b, nloc, heads, 1);
        ToSequence([new HeadPart(local, heads, byToken, 1, false)]);
        var rows = new float[local.Length];
        local.CopyToHost(rows);
        lse.CopyFromHost(Transpose(rows, b, nloc, heads));
    }

    /// <summary>[B, X, Y] → [B, Y, X].</summary>
    private static float[] Transpose(float[] a, int b, int x, int y)
    {
        var t = new float[a.Length];
        for (int bb = 0; bb < b; bb++)
            for (int i = 0; i < x; i++)
                for (int j = 0; j < y; j++)
                    t[((long)bb * y + j) * x + i] = a[((long)bb * x + i) * y + j];
        return t;
    }

    private static int HeadsPerRank(HeadPart pt) => pt.Heads.Shape[2];
}
