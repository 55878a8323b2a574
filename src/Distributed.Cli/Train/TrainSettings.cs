namespace Distributed.Cli.Train;

/// <summary>Everything <c>dsattn train</c> needs; the defaults are the measured default run.</summary>
internal sealed record TrainSettings
{
    /// <summary>In-process ranks (not under mpiexec).</summary>
    public int Ranks { get; init; } = 2;
    public int Steps { get; init; } = DefaultSteps;
    public int SeqLen { get; init; } = 256;
    public int Layers { get; init; } = 2;
    public int Dim { get; init; } = 64;
    public int Heads { get; init; } = 4;
    public int Batch { get; init; } = 8;
    public int Pairs { get; init; } = 8;
    public int Queries { get; init; } = 32;
    public int Keys { get; init; } = 32;
    public int Values { get; init; } = 32;
    public ParallelScheme SoftmaxScheme { get; init; } = ParallelScheme.AllGather;
    public ParallelScheme LightningScheme { get; init; } = ParallelScheme.Lasp2;
    public ShardLayout Layout { get; init; } = ShardLayout.Zigzag;
    public ulong Seed { get; init; } = 1234;
    public float LearningRate { get; init; } = 1e-2f;
    /// <summary>Held-out sequences the final accuracy is measured on.</summary>
    public int EvalSequences { get; init; } = 256;
    public string? PlotPath { get; init; }
    public string? JsonPath { get; init; }
    /// <summary>In-process: train once per rank count and compare the curves (null: one run on <see cref="Ranks"/>).</summary>
    public int[]? CompareRanks { get; init; }
    /// <summary>Write progress to standard error.</summary>
    public bool Progress { get; init; }

    public const int DefaultSteps = 500;

    public RecallTask Task => new(SeqLen, Pairs, Queries, Keys, Values);

    public ModelConfig Model => new(Dim, Heads, Layers, Task.Vocabulary, Batch, SeqLen, SoftmaxScheme, LightningScheme, Layout);

    /// <summary>Linear warm-up over the first 10% of the steps (at most 30), then cosine decay to 10% of the peak.</summary>
    public float LearningRateAt(int step)
    {
        int warm = Math.Clamp(Steps / 10, 1, 30);
        if (step <= warm) return LearningRate * step / warm;
        double t = (step - warm) / (double)Math.Max(1, Steps - warm);
        return (float)(LearningRate * (0.1 + 0.9 * 0.5 * (1 + Math.Cos(Math.PI * t))));
    }

    /// <summary>A message naming the option and the fix, or null.</summary>
    public string? Problem(bool underMpi)
    {
        if (!underMpi && Ranks < 1) return $"--ranks must be at least 1 (got {Ranks}).";
        if (Steps < 1) return $"--steps must be at least 1 (got {Steps}).";
        if (Layers < 1) return $"--layers must be at least 1 (got {Layers}).";
        if (Batch < 1) return $"--batch must be at least 1 (got {Batch}).";
        if (Heads < 1 || Dim < 1 || Dim % Heads != 0) return $"--dim must be a positive multiple of --heads (got dim {Dim}, heads {Heads}).";
        if (!(LearningRate > 0) || float.IsInfinity(LearningRate)) return $"--lr must be positive (got {LearningRate}).";
        if (EvalSequences < 0) return $"--eval-sequences must be 0 or more (got {EvalSequences}).";
        if (SoftmaxScheme is ParallelScheme.Lasp2) return "--softmax-scheme lasp2 is for lightning attention; use allgather, ring, partial, ulysses or hybrid.";
        if (LightningScheme is not (ParallelScheme.Lasp2 or ParallelScheme.Ulysses or ParallelScheme.Hybrid))
            return $"--lightning-scheme {LightningScheme.ToString().ToLowerInvariant()} is for softmax attention; use lasp2, ulysses or hybrid.";
        if (CompareRanks is { } list)
        {
            if (underMpi) return "--compare-ranks runs several in-process jobs; under mpiexec give no --compare-ranks.";
            if (list.Length == 0 || list.Any(r => r < 1)) return "--compare-ranks takes rank counts of 1 or more, e.g. 1,2,4.";
        }
        if (Task.Problem() is { } task) return task;
        foreach (string? path in new[] { PlotPath, JsonPath })
        {
            if (path is null) continue;
            string? dir = Path.GetDirectoryName(Path.GetFullPath(path));
            if (dir is not null && !Directory.Exists(dir)) return $"the folder '{dir}' of {path} does not exist; create it or write elsewhere.";
        }
        return null;
    }
}
