using System.Globalization;
using Distributed.Cluster;
using Distributed.Kernels;

namespace Distributed.Cli.Run;

/// <summary>
/// Looks for NaN and ±Inf in a rank's local tensors, in pieces (no copy of a whole tensor on the host), and reports
/// the first bad element by its global index. <c>--check-finite</c> scans the inputs before the first step; under
/// <c>--check</c> the outputs are always scanned in full (the sampled check sees only its rows).
/// </summary>
internal static class FiniteScan
{
    private const int PieceFloats = 1 << 20;

    /// <summary>The non-finite elements of one local tensor.</summary>
    /// <param name="Count">Non-finite elements on this rank.</param>
    /// <param name="First">The first one's flat index in the global tensor (C order), -1 when none.</param>
    /// <param name="Value">Its value (NaN, +Inf or -Inf).</param>
    internal readonly record struct Finding(long Count, long First, float Value);

    /// <summary>
    /// Scans a local tensor <c>[B, Nloc, heads, dim]</c> (or LSE <c>[B, H, Nloc]</c> with <paramref name="lse"/>,
    /// where −∞ marks a row that sees no key and is allowed) and maps the first bad element to its global index.
    /// </summary>
    public static Finding Scan(DeviceTensor t, IReadOnlyList<(int Start, int Count)> ranges, int seqLen, bool lse = false)
    {
        var piece = new float[(int)Math.Min(PieceFloats, Math.Max(1, t.Length))];
        long count = 0, first = -1;
        float firstValue = 0;
        for (long offset = 0; offset < t.Length; offset += piece.Length)
        {
            int len = (int)Math.Min(piece.Length, t.Length - offset);
            t.CopyToHost(piece.AsSpan(0, len), offset);
            for (int i = 0; i < len; i++)
            {
                float x = piece[i];
                if (float.IsFinite(x) || (lse && float.IsNegativeInfinity(x))) continue;
                if (count++ == 0) { first = offset + i; firstValue = x; }
            }
        }
        return new Finding(count, first < 0 ? -1 : GlobalFlat(t, first, ranges, seqLen, lse), firstValue);
    }

    /// <summary>
    /// Collective: every rank's findings for the same list of tensors, gathered to every rank (one all-gather of
    /// 7 floats per tensor and rank). Returns one line per (rank, tensor) with a non-finite value, naming the first
    /// bad element by its global index, e.g. <c>rank 2: Q has 3 NaN/Inf value(s), first Q[b=0, n=517, h=3, d=12] = NaN</c>.
    /// </summary>
    /// <param name="comm">The job's communicator.</param>
    /// <param name="tensors">Each tensor's name and global shape (e.g. Q and [B, N, H, D]).</param>
    /// <param name="mine">This rank's finding per tensor, in the same order.</param>
    public static List<string> Gather(ICommunicator comm, IReadOnlyList<(string Name, long[] GlobalShape)> tensors, IReadOnlyList<Finding> mine)
    {
        const int Per = 7;
        // Counts and indices travel as exact 16-bit halves; the value itself travels as a float.
        var send = new float[Per * tensors.Count];
        for (int i = 0; i < tensors.Count; i++)
        {
            ulong c = (ulong)Math.Min(mine[i].Count, uint.MaxValue), f = unchecked((ulong)mine[i].First);
            send[Per * i] = (c >> 16) & 0xFFFF;
            send[Per * i + 1] = c & 0xFFFF;
            for (int h = 0; h < 4; h++) send[Per * i + 2 + h] = (f >> (48 - 16 * h)) & 0xFFFF;
            send[Per * i + 6] = mine[i].Value;
        }
        var all = new float[send.Length * comm.Size];
        comm.AllGather(send, all);
        var lines = new List<string>();
        for (int r = 0; r < comm.Size; r++)
            for (int i = 0; i < tensors.Count; i++)
            {
                int at = r * send.Length + Per * i;
                long c = ((long)all[at] << 16) | (long)all[at + 1];
                if (c == 0) continue;
                ulong f = 0;
                for (int h = 0; h < 4; h++) f = (f << 16) | (ulong)all[at + 2 + h];
                var (name, shape) = tensors[i];
                lines.Add($"rank {r}: {name} has {c} NaN/Inf value(s), first {name}{Format((long)f, shape)} = {all[at + 6].ToString(CultureInfo.InvariantCulture)}");
            }
        return lines;
    }

    /// <summary>The global flat index of local element <paramref name="local"/>: its token position mapped through the ranges.</summary>
    private static long GlobalFlat(DeviceTensor t, long local, IReadOnlyList<(int Start, int Count)> ranges, int seqLen, bool lse)
    {
        var s = t.Shape;
        long[] idx = new long[s.Count];
        long rest = local;
        for (int d = s.Count - 1; d >= 0; d--)
        {
            idx[d] = rest % s[d];
            rest /= s[d];
        }
        int tokenAxis = lse ? 2 : 1;
        long n = idx[tokenAxis];
        foreach (var (start, count) in ranges)
        {
            if (n < count) { n += start; break; }
            n -= count;
        }
        idx[tokenAxis] = n;
        long flat = 0;
        for (int d = 0; d < s.Count; d++) flat = flat * (d == tokenAxis ? seqLen : s[d]) + idx[d];
        return flat;
    }

    private static string Format(long flat, long[] shape)
    {
        string[] names = shape.Length == 3 ? ["b", "h", "n"] : ["b", "n", "h", "d"];
        var idx = new long[shape.Length];
        for (int d = shape.Length - 1; d >= 0; d--)
        {
            idx[d] = flat % shape[d];
            flat /= shape[d];
        }
        return "[" + string.Join(", ", idx.Select((v, i) => $"{names[i]}={v}")) + "]";
    }
}
