namespace Distributed.Cluster;

/// <summary>
/// The one entry point a command needs to run a body on every rank: under MPICH's mpiexec it runs on
/// <see cref="MpiCommunicator.RunWorld"/>, otherwise on in-process ranks
/// (<see cref="InProcessCommunicator.Run{T}"/>), and under Open MPI it refuses with the fix. Either way a
/// failing rank ends the job promptly with "rank R failed: ..." on the error writer and a non-zero exit code.
/// </summary>
public static class RankRunner
{
    /// <summary>
    /// Runs <paramref name="body"/> on every rank and returns the job's exit code.
    /// </summary>
    /// <param name="inProcessRanks">Ranks to start when not under mpiexec (≥ 1). Under mpiexec the world
    /// size set by <c>mpiexec -n</c> rules and this value is not used.</param>
    /// <param name="body">A rank's work; returns that rank's exit code (0 = success).</param>
    /// <param name="timeout">In-process only: fail the job when it has not finished by then (null: no limit).
    /// Under mpiexec use the launcher's timeout (<c>dsattn launch --timeout</c>).</param>
    /// <param name="error">Where failures are reported in-process (default: standard error). Under mpiexec
    /// each rank writes to its own standard error, as <see cref="MpiCommunicator.RunWorld"/> does.</param>
    /// <returns>0 when every rank returned 0; otherwise the lowest rank's non-zero code, or 1 when a rank
    /// threw (in-process), the job timed out, or the launch was refused.</returns>
    public static int Run(int inProcessRanks, Func<ICommunicator, int> body, TimeSpan? timeout = null, TextWriter? error = null) =>
        Run(LaunchEnvironment.Detect(), inProcessRanks, body, timeout, error);

    /// <summary>As <see cref="Run(int, Func{ICommunicator, int}, TimeSpan?, TextWriter?)"/>, with the launch
    /// environment given (tests pass one).</summary>
    /// <param name="launch">How this process was started.</param>
    /// <param name="inProcessRanks">Ranks to start when not under mpiexec (≥ 1).</param>
    /// <param name="body">A rank's work; returns that rank's exit code.</param>
    /// <param name="timeout">In-process time limit, or null.</param>
    /// <param name="error">Where failures are reported (default: standard error).</param>
    public static int Run(LaunchEnvironment launch, int inProcessRanks, Func<ICommunicator, int> body, TimeSpan? timeout = null, TextWriter? error = null)
    {
        ArgumentNullException.ThrowIfNull(launch);
        ArgumentNullException.ThrowIfNull(body);
        error ??= Console.Error;
        switch (launch.Kind)
        {
            case LaunchKind.Mpich:
                // Before MPI starts its threads (and ours), so that they inherit the mask.
                try
                {
                    RankAffinity.Apply(launch);
                }
                catch (InvalidOperationException e)
                {
                    if (launch.Rank == 0) error.WriteLine(e.Message);
                    return 2;
                }
                return MpiCommunicator.RunWorld(body);
            case LaunchKind.OpenMpi:
                error.WriteLine($"rank {launch.Rank} failed: Open MPI's mpiexec started this process, but MPI.NET here speaks the MPICH ABI. Launch with MPICH's mpiexec (mpiexec.mpich; apt-get install mpich) or use dsattn launch.");
                return 1;
        }
        if (inProcessRanks < 1)
            throw new ArgumentOutOfRangeException(nameof(inProcessRanks), inProcessRanks, "Run at least 1 in-process rank (--ranks 1 or more).");
        try
        {
            int[] codes = InProcessCommunicator.Run(inProcessRanks, body, timeout);
            return codes.FirstOrDefault(c => c != 0);
        }
        catch (RankFailedException e)
        {
            error.WriteLine(e.Message);
            if (Environment.GetEnvironmentVariable("DSATTN_TRACE") == "1") error.WriteLine(e.InnerException);
            return 1;
        }
    }
}
