using System.Security.Cryptography;
using Distributed.Cli.Commands;
using Distributed.Cluster;
using Distributed.Cluster.ControlPlane;
using Distributed.IO;
using Distributed.Kernels;
using Distributed.Kernels.Ilgpu;

namespace Distributed.Cli.Run;

/// <summary>
/// Carries out <c>dsattn run</c>: everything that can be checked before ranks start is checked once, in
/// this process (shapes from the files, options, memory per rank, output folders); then every rank runs
/// the jobs, writes its rows, and the outputs are committed only when every rank succeeded.
/// </summary>
internal static class RunExecution
{
    /// <summary>Creates a rank's kernel backend: (name, device index, CPU threads).</summary>
    internal delegate IKernelBackend BackendFactory(string name, int device, int cpuThreads);

    /// <summary>Prints a refusal (once per job: rank 0 only under mpiexec) and returns exit code 2.</summary>
    public static int Refuse(string problem)
    {
        var launch = LaunchEnvironment.Detect();
        if (launch.Kind != LaunchKind.Mpich || launch.Rank <= 0)
            Console.Error.WriteLine($"dsattn run: {problem}");
        return 2;
    }

    public static int Execute(RunSettings s, ShapeOptions given, bool representative, BackendFactory? backendFactory = null)
    {
        AttentionShape shape;
        try
        {
            shape = s.Files.HasInputs
                ? RunInputs.ShapeFromFiles(s.Files, s.Backward, given)
                : new AttentionShape(given.Batch ?? 1, given.SeqLen ?? RunCommand.DefaultSeqLen, given.Heads ?? 8,
                    given.KvHeads ?? given.Heads ?? 8, given.HeadDim ?? 64, given.ValueDim ?? given.HeadDim ?? 64);
        }
        catch (Exception e) when (e is ArgumentException or IOException or UnauthorizedAccessException)
        {
            return Refuse(Plain(e));
        }
        // The representative job runs each kind at its own length unless --seq (or a file) fixes it.
        var jobs = s.Jobs.Select(j => (Spec: j, Shape: representative && given.SeqLen is null && !s.Files.HasInputs
            ? shape with { SeqLen = j.Attention == AttentionKind.Lightning ? RunCommand.RepresentativeLightningSeqLen : RunCommand.RepresentativeSoftmaxSeqLen }
            : shape)).ToList();
        s = s with { Batch = shape.Batch, SeqLen = shape.SeqLen, Heads = shape.Heads, KvHeads = shape.KvHeads, HeadDim = shape.HeadDim, ValueDim = shape.ValueDim };
        var launch = LaunchEnvironment.Detect();
        int ranks = launch.Kind == LaunchKind.Mpich ? launch.Size : s.Ranks;
        if (Validate(s, jobs, ranks, launch.Kind == LaunchKind.Mpich) is { } problem)
            return Refuse(problem);
        // Under mpiexec every rank would load the MPI library and fail alike: check it before MPI starts, said by rank 0 only.
        if (launch.Kind == LaunchKind.Mpich && MpichLibrary.Probe().Problem is { } library)
            return Refuse($"{library} No rank started MPI.");

        if (launch.Kind == LaunchKind.None && representative)
            Console.WriteLine($"dsattn run: the representative verified job on {s.Ranks} in-process ranks (no MPI needed). Options: dsattn run --help");
        // Ranks on this host share its cores: each rank's CPU backend gets its share.
        int ranksHere = launch.Kind == LaunchKind.Mpich ? Math.Max(1, launch.LocalSize) : s.Ranks;
        int threads = RankAffinity.ThreadsPerRank(ranksHere);
        backendFactory ??= (name, device, cpuThreads) => KernelBackends.Create(name, device, cpuThreads);
        bool controlPlane = launch.Kind == LaunchKind.Mpich && (s.ControlPlane ?? true);
        // In-process ranks keep their own detection: --hang-timeout, when given, is the job's time limit.
        TimeSpan? inProcessLimit = launch.Kind == LaunchKind.None && s.HangTimeout is { } h ? TimeSpan.FromSeconds(h) : null;
        return RankRunner.Run(launch, s.Ranks, comm =>
        {
            using var plane = controlPlane ? StartControlPlane(comm, s) : null;
            return RunRank(comm, s, jobs, launch.LocalRank >= 0 ? launch.LocalRank : comm.Rank, ranksHere, threads, representative, backendFactory);
        }, inProcessLimit);
    }

    /// <summary>The control plane of an MPI job (before the job's first collective): rank 0 hosts the
    /// coordinator; when its watchdog finds a hang it prints the report and aborts the whole job.</summary>
    private static JobControlPlane StartControlPlane(ICommunicator comm, RunSettings s) =>
        JobControlPlane.Start(comm, new JobControlPlaneOptions
        {
            Bind = s.CoordinatorBind,
            HangTimeout = TimeSpan.FromSeconds(s.HangTimeout ?? 300),
            OnHang = report =>
            {
                Console.Error.WriteLine(report);
                MpiCommunicator.AbortJob(1);
            },
        });

    private static string? Validate(RunSettings s, List<(JobSpec Spec, AttentionShape Shape)> jobs, int ranks, bool underMpi)
    {
        if (!underMpi && s.Ranks < 1) return $"--ranks must be at least 1 (got {s.Ranks}).";
        if (s.Batch < 1) return $"--batch must be at least 1 (got {s.Batch}).";
        if (s.SeqLen < 1) return $"--seq must be at least 1 (got {s.SeqLen}).";
        if (s.Heads < 1) return $"--heads must be at least 1 (got {s.Heads}).";
        if (s.KvHeads < 1 || s.Heads % s.KvHeads != 0) return $"--kv-heads must divide --heads (got H={s.Heads}, Hk={s.KvHeads}); e.g. --kv-heads {s.Heads}.";
        if (s.HeadDim < 1) return $"--head-dim must be at least 1 (got {s.HeadDim}).";
        if (s.ValueDim < 1) return $"--value-dim must be at least 1 (got {s.ValueDim}).";
        if (s.HangTimeout is { } ht && !(ht > 0)) return $"--hang-timeout must be positive (got {ht}).";
        if (s.Iterations < 1) return $"--iterations must be at least 1 (got {s.Iterations}).";
        if (s.Warmup < 0) return $"--warmup must be 0 or more (got {s.Warmup}).";
        if (s.CheckRows < 0) return $"--check-rows must be 0 or more (got {s.CheckRows}).";
        if (!(s.Tolerance > 0)) return "--tolerance must be positive.";
        var f = s.Files;
        if (!f.HasInputs && (f.K ?? f.V ?? f.DOut) is not null) return "--k, --v and --dout need --q as well: give all of Q, K and V as files, or none.";
        if (f.GradsPrefix is not null && !s.Backward) return "--grads writes gradients, which only --backward computes; add --backward or drop --grads.";
        if (f.Outputs.Count > 0 && jobs.Count > 1) return "--out, --lse and --grads write one job's tensors, but without --attention and --scheme run does two jobs; give --attention (and --scheme).";
        if (f.Lse is not null && jobs.Any(j => j.Spec.Attention != AttentionKind.Softmax)) return "--lse applies to softmax attention only (lightning attention has no log-sum-exp); drop it or use --attention softmax.";
        foreach (var (tensor, path) in f.Outputs)
        {
            if (f.Outputs.Count(o => Path.GetFullPath(o.Path) == Path.GetFullPath(path)) > 1) return $"{tensor} and another output both go to {path}; give each output its own file.";
            foreach (string? input in new[] { f.Q, f.K, f.V, f.DOut })
                if (input is not null && Path.GetFullPath(input) == Path.GetFullPath(path))
                    return $"the output {path} is also an input; write to another file (inputs are never overwritten).";
        }
        try
        {
            foreach (var (spec, shape) in jobs)
            {
                if (spec.Attention == AttentionKind.Lightning) _ = RunSettings.ParseDecay(spec.DecaySpec, s.Heads);
                int ranksPerHost = underMpi ? Math.Max(1, LaunchEnvironment.Detect().LocalSize) : ranks;
                SequenceParallelAttention.CheckFits(shape, RankJob.Options(spec, s), ranks, ranksPerHost);
            }
        }
        catch (ArgumentException e) { return Plain(e); }
        if (s.JsonPath is not null)
        {
            string? dir = Path.GetDirectoryName(Path.GetFullPath(s.JsonPath));
            if (dir is not null && !Directory.Exists(dir)) return $"--json: the folder '{dir}' does not exist; create it or write elsewhere.";
        }
        try
        {
            AtomicOutputs.CheckWritable([.. f.Outputs.Select(o => o.Path)], [.. f.Outputs.Select(o => OptionOf(o.Tensor))]);
        }
        catch (IOException e) { return e.Message; }
        return null;
    }

    /// <summary>The message without .NET's "(Parameter 'x')" suffix: ours already name the option.</summary>
    private static string Plain(Exception e) =>
        e is ArgumentException { ParamName: { } p } ? e.Message.Replace($" (Parameter '{p}')", "", StringComparison.Ordinal) : e.Message;

    private static string OptionOf(string tensor) => tensor switch { "O" => "--out", "LSE" => "--lse", _ => "--grads" };

    internal static string Describe(JobSpec job, AttentionShape s) =>
        $"{job.Attention.ToString().ToLowerInvariant()} / {SchemeRegistry.Describe(job.Scheme).Name} ({(job.Causal ? "causal" : "non-causal")}{(job.Attention == AttentionKind.Lightning ? $", decay {job.DecaySpec}" : "")}) " +
        $"B={s.Batch} N={s.SeqLen} H={s.Heads} Hk={s.KvHeads} D={s.HeadDim} Dv={s.ValueDim}";

    private static int RunRank(ICommunicator comm, RunSettings s, List<(JobSpec Spec, AttentionShape Shape)> jobs, int localRank,
        int localRanks, int cpuThreads, bool representative, BackendFactory backendFactory)
    {
        // auto is decided from the host's device count alone, so no job mixes CUDA and CPU ranks.
        var placement = DevicePlacement.Choose(s.Backend, localRank, localRanks, s.Device, KernelBackends.CudaDeviceCount());
        int device = placement.Device;
        using var backend = backendFactory(placement.Backend, device, cpuThreads);
        string where = comm is InProcessCommunicator ? "in-process" : "MPI";
        // Every rank says where it runs; one line per rank, in rank order.
        for (int r = 0; r < comm.Size; r++)
        {
            if (r == comm.Rank)
            {
                if (placement.Warning is not null) Console.WriteLine(placement.Warning);
                Console.WriteLine($"rank {comm.Rank}/{comm.Size} ({where}, host {Environment.MachineName}): backend {backend.Name}, device {DeviceName(backend, device, cpuThreads)}");
            }
            comm.Barrier();
        }
        string jobId = AgreeJobId(comm);
        RunOutputs? outputs = null;
        try
        {
            if (s.Files.Outputs.Count > 0) outputs = RunOutputs.Begin(comm, s.Files, jobId, jobs[0].Shape);
            var results = new List<JobResult>();
            foreach (var (job, shape) in jobs)
            {
                JobResult result;
                // One bar per job, gone before the job's summary is printed.
                using (var progress = RunProgress.Create(s.Progress, comm.Rank == 0))
                {
                    void Log(string line) { if (comm.Rank == 0) progress.WriteLine(line); }
                    Log($"{Describe(job, shape)}: forward{(s.Backward ? " + backward" : "")}, {s.Iterations} iteration(s)...");
                    result = RankJob.Execute(comm, backend, () => backendFactory(placement.Backend, device, 0), job, shape, s, outputs, progress, Log);
                }
                if (result.Refusal is { } why)
                {
                    // Every rank reached the same verdict collectively; say it once and write nothing.
                    if (comm.Rank == 0) Console.Error.WriteLine($"dsattn run: {why}");
                    outputs?.Abort();
                    return 2;
                }
                results.Add(result);
                if (comm.Rank == 0) RunSummary.Print(result, s, comm is InProcessCommunicator);
            }
            bool passed = results.All(r => r.Passed);
            bool committed = outputs?.Finish(comm, passed) ?? passed;
            if (comm.Rank == 0)
            {
                if (outputs is not null)
                    Console.WriteLine(committed
                        ? $"wrote {string.Join(", ", outputs.Targets)}"
                        : "outputs not written: the check failed (no file was created or changed)");
                if (s.JsonPath is not null) RunSummary.WriteJson(s.JsonPath, results, s, outputs?.Targets, committed);
                if (representative)
                    Console.WriteLine(passed
                        ? "Shown: LASP-2 (its [B,H,D,Dv] states all-gathered once per pass, bytes independent of N) and all-gather-KV softmax split over the ranks match an independent fp64 reference on sampled rows, forward and backward."
                        : "FAILED: the distributed result differs from the fp64 reference beyond tolerance.");
            }
            return passed && committed ? 0 : 1;
        }
        catch
        {
            outputs?.Abort();
            throw;
        }
        finally
        {
            outputs?.Dispose();
        }
    }

    private static string DeviceName(IKernelBackend backend, int device, int cpuThreads) => backend is IlgpuBackend ilgpu
        ? (ilgpu.Accelerator.AcceleratorType == ILGPU.Runtime.AcceleratorType.Cuda ? $"cuda:{device} " : "") + ilgpu.Accelerator.Name
        : $"host CPU, {cpuThreads} thread(s){(RankAffinity.Description.StartsWith("cores", StringComparison.Ordinal) ? $" on {RankAffinity.Description}" : "")}";

    /// <summary>A random id for this job's temporary files, drawn on rank 0 and shared with every rank.</summary>
    private static string AgreeJobId(ICommunicator comm)
    {
        // Two 16-bit halves travel exactly as floats.
        int id = comm.Rank == 0 ? RandomNumberGenerator.GetInt32(int.MaxValue) : 0;
        var mine = new float[] { id >> 16, id & 0xFFFF };
        var all = new float[2 * comm.Size];
        comm.AllGather(mine, all);
        int agreed = ((int)all[0] << 16) | (int)all[1];
        return agreed.ToString("x8", System.Globalization.CultureInfo.InvariantCulture);
    }
}
