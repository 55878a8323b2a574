using System.Diagnostics;
using Distributed.Cluster;

namespace Distributed.Cli.Scaling;

/// <summary>
/// Measures the link between ranks 0 and 1 of a communicator for the alpha-beta model: the best of 20
/// exchanges (<see cref="ICommunicator.SendRecv"/> both ways at once) at 256 bytes and at 4 MiB;
/// <c>β = Δbytes / Δtime</c> and <c>α = t_small − 256/β</c>. Other ranks take no part.
/// </summary>
internal static class LinkProbe
{
    private const int SmallFloats = 64, LargeFloats = 1 << 20, Repeats = 20;

    /// <summary>(α seconds, β bytes per second) on rank 0; (0, 0) elsewhere or with one rank.</summary>
    public static (double AlphaSeconds, double BytesPerSecond) Measure(ICommunicator world)
    {
        if (world.Size < 2) return (0, 0);
        using var pair = world.Split(world.Rank < 2 ? 0 : 1, world.Rank);
        double small = 0, large = 0;
        if (world.Rank < 2)
        {
            int peer = 1 - pair.Rank;
            double Best(int floats)
            {
                var send = new float[floats];
                var receive = new float[floats];
                pair.SendRecv(send, peer, receive, peer); // warm-up
                double best = double.MaxValue;
                for (int i = 0; i < Repeats; i++)
                {
                    pair.Barrier();
                    long t = Stopwatch.GetTimestamp();
                    pair.SendRecv(send, peer, receive, peer);
                    best = Math.Min(best, Stopwatch.GetElapsedTime(t).TotalSeconds);
                }
                return best;
            }
            small = Best(SmallFloats);
            large = Best(LargeFloats);
        }
        world.StartAllGather(new float[1], new float[world.Size]).Wait();
        if (world.Rank != 0) return (0, 0);
        double beta = (LargeFloats - SmallFloats) * 4.0 / Math.Max(large - small, 1e-9);
        double alpha = Math.Max(0, small - SmallFloats * 4.0 / beta);
        return (alpha, beta);
    }
}
