using Distributed.Cluster;
using Distributed.Cluster.TestWorker;

// The MPI side of the communicator tests, started by the tests as `mpiexec -n P dotnet worker.dll MODE`.
//   contract    runs every CommunicatorContract check and prints "CHECK <name> <rank> ok|FAIL <why>"
//   fail <R>    rank R throws while the others wait in a collective (the job must abort, naming R)
//   hang <tag>  rank 0 never joins the barrier the others wait in (the launcher's timeout must kill all;
//               the tag only marks the processes so the test can look for survivors)
//   runner-fail <R>  as fail, through RankRunner (MPI under mpiexec, else 3 in-process ranks)
//   wait-cpu    rank 0 computes (sleeps) 2 s while the others wait in a barrier, a large all-gather and a
//               started all-gather's Wait; each waiter prints "WAITCPU <op> <rank> <cpu ms> <wall ms>"
//   progress <ms> [floats]  every rank starts an all-gather of [floats] (default 512 Ki: 2 MiB) floats per
//               rank, then computes for <ms> ms without calling MPI, watching its receive buffer; prints
//               "PROGRESS <rank> <arrived ms or -1> <wait ms> <cpu ms>": when every peer's block was there
//               (-1: not before Wait), how long Wait took after the compute, and the process CPU time used
//               (DSATTN_MPI_PROGRESS picks the progress mode)
//   bench [P]   times AllGather / AllReduceSum / SendRecv ring on 1 Mi floats (MPI under mpiexec, else P in-process ranks)
string mode = args.Length > 0 ? args[0] : "contract";
if (mode == "bench")
{
    int inProcess = args.Length > 1 ? int.Parse(args[1], System.Globalization.CultureInfo.InvariantCulture) : 2;
    return RankRunner.Run(inProcess, comm =>
    {
        const int n = 1 << 20;
        var send = new float[n];
        var gathered = new float[n * comm.Size];
        var sum = new float[n];
        var ring = new float[n];
        int next = (comm.Rank + 1) % comm.Size, prev = (comm.Rank - 1 + comm.Size) % comm.Size;
        (string Name, Action Op)[] ops =
        [
            ("AllGather", () => comm.AllGather(send, gathered)),
            ("AllReduceSum", () => comm.AllReduceSum(send, sum)),
            ("SendRecv", () => comm.SendRecv(send, next, ring, prev)),
        ];
        foreach (var (name, op) in ops)
        {
            for (int i = 0; i < 3; i++) op();
            comm.Barrier();
            var sw = System.Diagnostics.Stopwatch.StartNew();
            const int reps = 20;
            for (int i = 0; i < reps; i++) op();
            comm.Barrier();
            double ms = sw.Elapsed.TotalMilliseconds / reps;
            if (comm.Rank == 0) Console.WriteLine($"BENCH {comm.GetType().Name} P={comm.Size} {name} 4 MiB/rank: {ms:F2} ms");
        }
        return 0;
    });
}
if (mode == "runner-fail")
{
    int failing = int.Parse(args[1], System.Globalization.CultureInfo.InvariantCulture);
    return RankRunner.Run(3, comm =>
    {
        comm.Barrier();
        if (comm.Rank == failing) throw new InvalidOperationException($"deliberate failure on rank {failing}");
        var x = new float[4];
        comm.AllReduceSum(x, x);
        Console.WriteLine($"rank {comm.Rank} of {comm.Size} finished");
        return 0;
    }, TimeSpan.FromSeconds(60));
}
return MpiCommunicator.RunWorld(comm =>
{
    if (mode == "hang")
    {
        if (comm.Rank == 0) Thread.Sleep(Timeout.Infinite);
        comm.Barrier();
        return 0;
    }
    if (mode == "wait-cpu")
    {
        var send = new float[1 << 18];
        var gathered = new float[send.Length * comm.Size];
        (string Name, Action Op)[] ops =
        [
            ("Barrier", comm.Barrier),
            ("AllGather", () => comm.AllGather(send, gathered)),
            ("StartAllGather", () => comm.StartAllGather(send, gathered).Wait()),
        ];
        foreach (var (name, op) in ops)
        {
            comm.Barrier();
            if (comm.Rank == 0) Thread.Sleep(2000);
            using var self = System.Diagnostics.Process.GetCurrentProcess();
            var cpu = self.TotalProcessorTime;
            var wall = System.Diagnostics.Stopwatch.StartNew();
            op();
            self.Refresh();
            if (comm.Rank != 0) Console.WriteLine($"WAITCPU {name} {comm.Rank} {(self.TotalProcessorTime - cpu).TotalMilliseconds:F0} {wall.Elapsed.TotalMilliseconds:F0}");
        }
        comm.Barrier();
        return 0;
    }
    if (mode == "progress")
    {
        double computeMs = double.Parse(args[1], System.Globalization.CultureInfo.InvariantCulture);
        int n = args.Length > 2 ? int.Parse(args[2], System.Globalization.CultureInfo.InvariantCulture) : 1 << 19;
        var send = Enumerable.Range(0, n).Select(i => CommunicatorContract.V(comm.Rank, i)).ToArray();
        var gathered = new float[n * comm.Size];
        Array.Fill(gathered, float.NaN);
        comm.Barrier();
        using var self = System.Diagnostics.Process.GetCurrentProcess();
        var cpu = self.TotalProcessorTime;
        var request = comm.StartAllGather(send, gathered);
        var clock = System.Diagnostics.Stopwatch.StartNew();
        double arrived = -1, busy = 0;
        // "Compute": arithmetic over the send block, no MPI call; every pass looks whether every peer's block
        // (its first and last element) has landed in the receive buffer.
        while (clock.Elapsed.TotalMilliseconds < computeMs)
        {
            for (int i = 0; i < 4096; i++) busy += Math.Sqrt(send[i % n] + i);
            if (arrived < 0 && Enumerable.Range(0, comm.Size).All(r => Volatile.Read(ref gathered[r * n]) == CommunicatorContract.V(r, 0)
                && Volatile.Read(ref gathered[r * n + n - 1]) == CommunicatorContract.V(r, n - 1)))
                arrived = clock.Elapsed.TotalMilliseconds;
        }
        var waitClock = System.Diagnostics.Stopwatch.StartNew();
        request.Wait();
        double waitMs = waitClock.Elapsed.TotalMilliseconds;
        self.Refresh();
        for (int r = 0; r < comm.Size; r++)
            for (int i = 0; i < n; i += 997)
                if (gathered[r * n + i] != CommunicatorContract.V(r, i)) throw new InvalidOperationException($"all-gather block {r}[{i}] = {gathered[r * n + i]}, expected {CommunicatorContract.V(r, i)}");
        Console.WriteLine(FormattableString.Invariant($"PROGRESS {comm.Rank} {arrived:F1} {waitMs:F2} {(self.TotalProcessorTime - cpu).TotalMilliseconds:F0} {(busy > 0 ? "" : " ")}"));
        comm.Barrier();
        return 0;
    }
    if (mode == "fail")
    {
        int failing = int.Parse(args[1], System.Globalization.CultureInfo.InvariantCulture);
        comm.Barrier();
        if (comm.Rank == failing) throw new InvalidOperationException($"deliberate failure on rank {failing}");
        var x = new float[4];
        comm.AllReduceSum(x, x);
        comm.Barrier();
        return 0;
    }
    int failures = 0;
    foreach (string name in CommunicatorContract.Names)
    {
        string verdict;
        try
        {
            CommunicatorContract.Run(name, comm);
            verdict = "ok";
        }
        catch (ContractViolation e)
        {
            verdict = "FAIL " + e.Message;
            failures++;
        }
        Console.WriteLine($"CHECK {name} {comm.Rank} {verdict}");
        comm.Barrier();
    }
    Console.WriteLine($"DONE {comm.Rank} size={comm.Size} library={MpichLibrary.LoadedName}");
    return failures == 0 ? 0 : 1;
});
