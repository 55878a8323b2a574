using Distributed.Schemes;

namespace Distributed;

/// <summary>
/// What one rank of a scheme holds, in floats: the caller's local tensors, the scheme's device tensors and
/// its host staging, and the largest single buffer or collective (which must fit one array unless the
/// scheme stages in pieces). Counted from the same sizes the schemes allocate.
/// </summary>
internal readonly record struct MemoryEstimate(long CallerFloats, long SchemeFloats, long StagingFloats, long LargestSingleFloats)
{
    public long TotalBytes => (CallerFloats + SchemeFloats + StagingFloats) * sizeof(float);

    public static MemoryEstimate For(AttentionShape s, SequenceParallelOptions o, int ranks, ShardLayout layout)
    {
        long b = s.Batch, n = s.SeqLen, h = s.Heads, hk = s.KvHeads, d = s.HeadDim, dv = s.ValueDim;
        long qRow = h * d, kRow = hk * d, vRow = hk * dv, oRow = h * dv;
        int chunks = layout == ShardLayout.Zigzag ? 2 * ranks : ranks;
        // The longest shard: ⌈N / chunks⌉ tokens per chunk, one or two chunks per rank.
        long t = (n + chunks - 1) / chunks * (chunks / ranks);
        bool copiedParts = layout == ShardLayout.Zigzag && s.Batch > 1; // zigzag parts are views only when B = 1
        long caller = b * t * 2 * (qRow + kRow + vRow + oRow);            // q, k, v, o, dO, dQ, dK, dV
        long scheme, staging, largest;
        switch (o.Scheme)
        {
            case ParallelScheme.AllGather:
            {
                // One rank uses its own K, V, dK and dV as the whole sequence's and stages nothing.
                scheme = (ranks > 1 ? 2 * b * n * (kRow + vRow) : 0) + 2 * b * h * t + (copiedParts ? b * t * (2 * qRow + 2 * oRow) : 0);
                long gathered = Math.Min(b * n * (kRow + vRow), HostBuffer.PieceFloats) + b * ranks * (kRow + vRow);
                staging = ranks > 1 ? gathered + gathered / ranks + b * (kRow + vRow) : 0;
                largest = Math.Max(b * t * Math.Max(kRow + vRow, Math.Max(qRow, oRow)), gathered);
                break;
            }
            case ParallelScheme.Partial:
            {
                scheme = b * n * (2 * qRow + 3 * oRow) + 4 * b * h * n + b * t * 2 * oRow + 3 * b * h * t
                    + (copiedParts ? b * t * 2 * (kRow + vRow) : 0);
                long block = b * t * (oRow + h);
                staging = b * t * (oRow + 2 * h) + b * n * Math.Max(qRow, oRow + 2 * h) + Math.Max(2 * block * ranks, b * t * qRow * (ranks + 1));
                largest = Math.Max(b * n * Math.Max(qRow + 2 * h, oRow + 2 * h), 2 * block * ranks);
                break;
            }
            case ParallelScheme.Ring:
            {
                // The block on the device (K, V, dK, dV; one per distinct shard length), plus copies of its
                // zigzag ranges where they cannot be views.
                long blocks = n % chunks == 0 ? 1 : 2;
                scheme = 3 * b * h * t + b * t * oRow + blocks * b * t * 2 * (kRow + vRow)
                    + (copiedParts ? b * t * (2 * qRow + 2 * oRow + 2 * (kRow + vRow)) : 0);
                staging = 2 * b * t * 2 * (kRow + vRow);
                largest = b * t * 2 * (kRow + vRow);
                break;
            }
            case ParallelScheme.Ulysses:
            {
                long hl = h / ranks, kvl = (hk % ranks == 0 ? hk : h) / ranks;
                scheme = b * n * (2 * hl * d + 2 * kvl * d + 2 * kvl * dv + 2 * hl * dv) + 2 * b * hl * n;
                long block = b * t * (hl * d + kvl * d + kvl * dv);
                staging = 2 * block * ranks + b * t * Math.Max(qRow, Math.Max(oRow, Math.Max(kRow, vRow)));
                largest = Math.Max(block * ranks, b * n * Math.Max(hl * Math.Max(d, dv), kvl * Math.Max(d, dv)));
                break;
            }
            case ParallelScheme.Lasp2:
            {
                long state = b * h * d * dv, perRank = chunks / ranks;
                scheme = 2 * perRank * state + (copiedParts ? b * t * 2 * (qRow + kRow + vRow + oRow) : 0);
                staging = perRank * state * (1 + ranks) + chunks * state + 2 * perRank * state;
                largest = ranks * perRank * state;
                break;
            }
            case ParallelScheme.Lasp1:
            {
                // Device: the state and the kept S0; host: own, incoming, outgoing and the other side's sum.
                long state = b * h * d * dv;
                scheme = 2 * state;
                staging = 4 * state;
                largest = state;
                break;
            }
            default: // Hybrid: the head group's tensors, its shuffle, and the sequence scheme on them
            {
                int p = ranks;
                int ph = o.UlyssesDegree > 0 ? o.UlyssesDegree : Enumerable.Range(1, p).Where(x => p % x == 0 && s.Heads % x == 0).DefaultIfEmpty(1).Max();
                if (p % ph != 0 || s.Heads % ph != 0) ph = 1;
                int ps = p / ph;
                int hl = s.Heads / ph, kvl = s.KvHeads % ph != 0 ? hl : s.KvHeads / ph;
                var innerOptions = o with { Scheme = o.Attention == AttentionKind.Lightning ? ParallelScheme.Lasp2 : o.HybridSequenceScheme };
                var inner = For(s with { Heads = hl, KvHeads = kvl }, innerOptions, ps, layout);
                long groupT = (n + ps - 1) / ps + 1;
                long block = b * ((groupT + ph - 1) / ph) * (hl * d + kvl * d + kvl * dv);
                scheme = inner.CallerFloats + inner.SchemeFloats;
                staging = inner.StagingFloats + 2 * block * ph + b * t * Math.Max(qRow, oRow);
                largest = Math.Max(inner.LargestSingleFloats, block * ph);
                break;
            }
        }
        return new MemoryEstimate(caller, scheme, staging, largest);
    }
}
