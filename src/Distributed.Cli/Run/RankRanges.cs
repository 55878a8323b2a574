using Distributed.Cluster;

namespace Distributed.Cli.Run;

/// <summary>Every rank's token ranges, learned from the ranks themselves (schemes choose their own layouts).</summary>
internal static class RankRanges
{
    /// <summary>Collective: all-gathers each rank's ranges; element r holds rank r's ranges in its local order.</summary>
    public static IReadOnlyList<(int Start, int Count)>[] Gather(ICommunicator comm, IReadOnlyList<(int Start, int Count)> ranges)
    {
        const int MaxRanges = 4;
        if (ranges.Count > MaxRanges) throw new NotSupportedException($"--check supports at most {MaxRanges} token ranges per rank.");
        var mine = new float[1 + 4 * MaxRanges];
        mine[0] = ranges.Count;
        for (int i = 0; i < ranges.Count; i++)
        {
            mine[1 + 4 * i] = ranges[i].Start >> 16; mine[2 + 4 * i] = ranges[i].Start & 0xFFFF;
            mine[3 + 4 * i] = ranges[i].Count >> 16; mine[4 + 4 * i] = ranges[i].Count & 0xFFFF;
        }
        var all = new float[mine.Length * comm.Size];
        comm.AllGather(mine, all);
        var result = new IReadOnlyList<(int, int)>[comm.Size];
        for (int r = 0; r < comm.Size; r++)
        {
            int off = r * mine.Length;
            var list = new List<(int, int)>();
            for (int i = 0; i < (int)all[off]; i++)
                list.Add((((int)all[off + 1 + 4 * i] << 16) | (int)all[off + 2 + 4 * i], ((int)all[off + 3 + 4 * i] << 16) | (int)all[off + 4 + 4 * i]));
            result[r] = list;
        }
        return result;
    }
}
