using System.Diagnostics;
using Distributed.Cluster;
using Distributed.Kernels;
using Distributed.Kernels.Cpu;
using Xunit;
using Xunit.Abstractions;

namespace Distributed.Tests.Reliability;

/// <summary>
/// About a minute (DSATTN_SOAK_SECONDS overrides) of repeated forward + backward steps on 4 in-process ranks, cycling
/// through several schemes; each round starts fresh ranks and a fresh layer per scheme, runs several steps, and
/// disposes everything. Every step's outputs and gradients must equal that scheme's first step bit for bit; native
/// memory held by tensors, managed memory, threads and handles must not grow. Runs alone (the process-wide counters would otherwise measure other tests).
/// </summary>
[Collection(nameof(ProcessMemoryCollection))]
public sealed class SoakTests(ITestOutputHelper output)
{
    private static readonly TimeSpan Duration = TimeSpan.FromSeconds(double.TryParse(Environment.GetEnvironmentVariable("DSATTN_SOAK_SECONDS"), out double s) ? s : 60);

    private static readonly AttentionShape Shape = new(1, 320, 4, 2, 16, 16);

    private sealed record Snapshot(long Managed, long Native, long WorkingSet, int Threads, int Handles)
    {
        public static Snapshot Take()
        {
            for (int i = 0; i < 3; i++)
            {
                GC.Collect();
                GC.WaitForPendingFinalizers();
            }
            using var p = Process.GetCurrentProcess();
            p.Refresh();
            return new Snapshot(GC.GetTotalMemory(true), CpuTensor.LiveBytes, p.WorkingSet64, p.Threads.Count, p.HandleCount);
        }

        public override string ToString() =>
            $"managed {Managed / 1048576.0:F1} MiB, native (tensors) {Native / 1048576.0:F2} MiB, working set {WorkingSet / 1048576.0:F0} MiB, {Threads} threads, {Handles} handles";
    }

    [Fact]
    public void RepeatedForwardBackward_FourRanks_MemoryThreadsHandlesFlat_EveryStepEqualsTheFirst()
    {
        var cases = SchemeRun.AllSchemes(Shape).Where(c => c.Name is "lasp2" or "ulysses lightning" or "allgather" or "ring" or "partial" or "hybrid softmax Ph=2 x ring").ToList();
        var inputs = cases.ToDictionary(c => c.Name, c => c.Options.Attention == AttentionKind.Lightning ? GlobalInputs.Random(Shape, 71, 1f, 0.25f) : GlobalInputs.Random(Shape, 71));
        var first = new Dictionary<string, GlobalOutputs>();
        const int StepsPerRound = 4;

        // Warm-up round: JIT, thread pool, the first step of each scheme kept as the reference.
        foreach (var c in cases) first[c.Name] = SchemeRun.Run(c, 4, inputs[c.Name]);
        var start = Snapshot.Take();
        var clock = Stopwatch.StartNew();
        long steps = 0, rounds = 0;
        while (clock.Elapsed < Duration)
        {
            foreach (var c in cases)
            {
                // Each step's result is compared, not only the last: the runner hands back every step's outputs.
                foreach (var got in RunSteps(c, inputs[c.Name], StepsPerRound))
                {
                    Assert.True(got.BitwiseEquals(first[c.Name]), $"{c.Name}: step {steps} differs from the first step");
                    steps++;
                }
            }
            rounds++;
        }
        var end = Snapshot.Take();
        output.WriteLine($"{steps} forward+backward steps ({rounds} rounds over {cases.Count} schemes, {StepsPerRound} steps per layer) on 4 in-process ranks in {clock.Elapsed.TotalSeconds:F0} s");
        output.WriteLine($"start: {start}");
        output.WriteLine($"end:   {end}");
        // Process-wide: a test class that ran before may still hold (or later release) a tensor, so "no growth", not "equal".
        Assert.True(end.Native <= start.Native, $"native tensor memory grew from {start.Native} to {end.Native} bytes");
        Assert.True(end.Managed - start.Managed < 16L << 20, $"managed memory grew by {(end.Managed - start.Managed) / 1048576.0:F1} MiB");
        Assert.True(end.WorkingSet - start.WorkingSet < 256L << 20, $"working set grew by {(end.WorkingSet - start.WorkingSet) / 1048576.0:F0} MiB");
        Assert.True(end.Threads - start.Threads <= 8, $"threads grew from {start.Threads} to {end.Threads}");
        Assert.True(end.Handles - start.Handles <= 16, $"handles grew from {start.Handles} to {end.Handles}");
        Assert.True(steps >= cases.Count * StepsPerRound, "the soak ran no full round");
    }

    /// <summary>One layer on 4 fresh ranks running <paramref name="steps"/> forward + backward steps; every step's global outputs.</summary>
    private static List<GlobalOutputs> RunSteps(SchemeCase c, GlobalInputs x, int steps) => SchemeRun.Steps(c, 4, x, steps);
}
