using System.CommandLine;
using Distributed.Cluster;
using Distributed.Cluster.ControlPlane;

namespace Distributed.Cli.Commands;

/// <summary><c>dsattn launch --hostfile F -n P -- &lt;dsattn args&gt;</c>: runs this dsattn under MPICH's mpiexec.</summary>
internal static class LaunchCommand
{
    public static Command Create()
    {
        var hostfile = new Option<FileInfo?>("--hostfile") { Description = "Hostfile in MPICH (host[:slots]) or Open MPI (host slots=N) form; see hostfile.example. Default: this host only." };
        var ranks = new Option<int>("-n", "--ranks") { Description = "Number of ranks P.", Required = true };
        var timeout = new Option<int>("--timeout") { Description = "Kill the whole job (mpiexec, its proxies and every rank) after this many seconds; exit code 124. 0 = no limit.", DefaultValueFactory = _ => 0 };
        var dryRun = new Option<bool>("--dry-run") { Description = "Print the mpiexec command line without running it." };
        var controlPlane = new Option<string>("--control-plane") { Description = "on: this launcher hosts the job's coordinator (gRPC, token-protected), gives the ranks its address and token through their environment, and kills the job when its watchdog finds a hang; off: none.", DefaultValueFactory = _ => "on" };
        controlPlane.AcceptOnlyFromAmong("on", "off");
        var hangTimeout = new Option<double>("--hang-timeout") { Description = "Seconds ranks may wait inside a collective that another rank never entered before the job is killed.", DefaultValueFactory = _ => 300 };
        var coordinatorBind = new Option<string>("--coordinator-bind") { Description = "Address the coordinator listens on: 127.0.0.1 (this host) or e.g. 0.0.0.0 when ranks run on other hosts.", DefaultValueFactory = _ => "127.0.0.1" };
        var hostCheckPort = new Option<int?>("--host-check-port") { Description = "TCP port probed on every host of the hostfile that is not this machine, before mpiexec starts: a host that does not answer is refused with its line. Default: the port of hydra's launcher, 22 (ssh; 514 with HYDRA_LAUNCHER=rsh; no probe when HYDRA_LAUNCHER names a resource manager such as slurm). 0: resolve names only." };
        var hostCheckTimeout = new Option<double>("--host-check-timeout") { Description = "Seconds each host's name lookup, and then its port probe, may take before the host counts as unreachable.", DefaultValueFactory = _ => 5 };
        var rest = new Argument<string[]>("dsattn-args") { Description = "Arguments for every rank's dsattn, after --, e.g. -- run --attention lightning --scheme lasp2 --seq 65536.", Arity = ArgumentArity.ZeroOrMore };
        var command = new Command("launch", "Build the mpiexec (MPICH) command line that runs this dsattn on P ranks, print it, then run it and " +
            "return its exit code. Example: dsattn launch --hostfile hostfile.example -n 8 -- run --attention lightning --scheme lasp2")
        {
            hostfile, ranks, timeout, dryRun, controlPlane, hangTimeout, coordinatorBind, hostCheckPort, hostCheckTimeout, rest,
        };
        command.SetAction(parse =>
        {
            int p = parse.GetValue(ranks);
            if (p < 1)
            {
                Console.Error.WriteLine($"dsattn launch: -n must be at least 1 (got {p}).");
                return 2;
            }
            int seconds = parse.GetValue(timeout);
            if (seconds < 0)
            {
                Console.Error.WriteLine($"dsattn launch: --timeout must be 0 (no limit) or a number of seconds (got {seconds}).");
                return 2;
            }
            Hostfile? parsed = null;
            if (parse.GetValue(hostfile) is { } hf)
            {
                try { parsed = Hostfile.Parse(hf.FullName); }
                catch (Exception e) when (e is HostfileFormatException or FileNotFoundException)
                {
                    Console.Error.WriteLine($"dsattn launch: {e.Message}");
                    return 2;
                }
                if (CheckHosts(parsed, parse.GetValue(hostCheckPort), parse.GetValue(hostCheckTimeout)) is { } refused) return refused;
                if (parsed.TotalSlots < p)
                    Console.Error.WriteLine($"dsattn launch: note: the hostfile has {parsed.TotalSlots} slots for {p} ranks; mpiexec will oversubscribe.");
            }
            // The ranks load the MPI library this environment names: check it once here, not once per rank.
            var (libraryProblem, library, version) = MpichLibrary.Probe();
            if (libraryProblem is not null)
            {
                Console.Error.WriteLine($"dsattn launch: {libraryProblem} Nothing was started.");
                return 2;
            }
            Console.WriteLine($"MPI library: {library} ({version})");
            string? mpiexec = MpiLauncher.FindMpiexec();
            if (mpiexec is null)
            {
                Console.Error.WriteLine("dsattn launch: no MPICH mpiexec found. Install MPICH (apt-get install -y mpich); Open MPI's mpiexec is not supported (MPI.NET here speaks the MPICH ABI).");
                return 2;
            }
            string? hydraFile = null;
            if (parsed is not null)
            {
                // hydra reads only its own form, so hand it a rewritten copy.
                hydraFile = Path.Combine(Path.GetTempPath(), $"dsattn-hosts-{Environment.ProcessId}.txt");
                File.WriteAllText(hydraFile, parsed.ToHydraText());
            }
            var (program, prefix) = SelfCommand();
            var args = MpiLauncher.BuildArguments(p, hydraFile, program, [.. prefix, .. parse.GetValue(rest) ?? []]);
            Console.WriteLine(MpiLauncher.Format(mpiexec, args));
            if (parse.GetValue(dryRun)) return 0;
            double hang = parse.GetValue(hangTimeout);
            if (!(hang > 0))
            {
                Console.Error.WriteLine($"dsattn launch: --hang-timeout must be positive (got {hang}).");
                return 2;
            }
            LaunchResult result;
            using var killJob = new CancellationTokenSource();
            Coordinator? coordinator = null;
            string? tokenFile = null;
            var environment = new Dictionary<string, string?>();
            try
            {
                if (parse.GetValue(controlPlane) == "on")
                {
                    try
                    {
                        coordinator = Coordinator.Start(new CoordinatorOptions
                        {
                            Size = p, Bind = parse.GetValue(coordinatorBind)!, HangTimeout = TimeSpan.FromSeconds(hang),
                            OnHang = report =>
                            {
                                Console.Error.WriteLine(report);
                                Console.Error.Flush();
                                killJob.Cancel();
                            },
                        });
                        tokenFile = JobControlPlane.TokenFilePath(coordinator.Port);
                        JobControlPlane.WriteTokenFile(tokenFile, coordinator.Token);
                        // The ranks inherit mpiexec's environment (hydra passes it on): the token never
                        // appears on a command line.
                        environment["DSATTN_COORDINATOR"] = coordinator.Address;
                        environment["DSATTN_TOKEN"] = coordinator.Token;
                        Console.WriteLine($"control plane: coordinator at {coordinator.Address}, token in {tokenFile} (dsattn status --coordinator {coordinator.Address}), --hang-timeout {hang:0.#} s");
                    }
                    catch (Exception e) when (e is IOException or FormatException or UnauthorizedAccessException or InvalidOperationException or System.Net.Sockets.SocketException)
                    {
                        coordinator?.Dispose();
                        coordinator = null;
                        Console.Error.WriteLine($"dsattn launch: warning: the control-plane coordinator did not start ({e.GetType().Name}: {e.Message}); hang detection is off, the job goes on.");
                    }
                }
                result = MpiLauncher.Run(mpiexec, args, seconds > 0 ? TimeSpan.FromSeconds(seconds) : Timeout.InfiniteTimeSpan, Console.WriteLine,
                    environment, killJob.Token);
            }
            finally
            {
                // A dry run keeps the rewritten hostfile so the printed line can be run by hand.
                if (hydraFile is not null) File.Delete(hydraFile);
                coordinator?.Dispose();
                if (tokenFile is not null) File.Delete(tokenFile);
            }
            if (killJob.IsCancellationRequested)
            {
                Console.Error.WriteLine("dsattn launch: the watchdog ended the job (see its report above).");
                return 1;
            }
            if (result.TimedOut)
            {
                Console.Error.WriteLine($"dsattn launch: the job did not finish within {seconds} s and was killed.");
                return 124;
            }
            return result.ExitCode;
        });
        return command;
    }

    /// <summary>
    /// Refuses the job (exit code 2, one message per bad host naming its line and the fix) when a host of the
    /// hostfile does not resolve or, not being this machine, does not answer on the launcher's port.
    /// </summary>
    private static int? CheckHosts(Hostfile hosts, int? portOption, double timeoutSeconds)
    {
        if (!(timeoutSeconds > 0) || double.IsInfinity(timeoutSeconds))
        {
            Console.Error.WriteLine($"dsattn launch: --host-check-timeout must be a positive number of seconds (got {timeoutSeconds}).");
            return 2;
        }
        if (portOption is < 0 or > 65535)
        {
            Console.Error.WriteLine($"dsattn launch: --host-check-port must be a TCP port 1 to 65535, or 0 to skip the probe (got {portOption}).");
            return 2;
        }
        var (defaultPort, launcher) = HostReachability.LauncherPort(Environment.GetEnvironmentVariable);
        int? port = portOption is { } given ? (given == 0 ? null : given) : defaultPort;
        var remote = hosts.Entries.Where(e => !HostReachability.IsLocalName(e.Host)).Select(e => e.Host).Distinct().ToList();
        var bad = HostReachability.Find(hosts, port, TimeSpan.FromSeconds(timeoutSeconds), launcher);
        foreach (var b in bad)
            Console.Error.WriteLine($"dsattn launch: {hosts.SourceName}:{b.Entry.Line}: host '{b.Entry.Host}' cannot be reached: {b.Reason}. {b.Fix}; nothing was started.");
        if (bad.Count > 0) return 2;
        if (remote.Count > 0)
            Console.WriteLine(port is null
                ? $"hosts: {string.Join(", ", remote)} resolve (no port probe: {(portOption == 0 ? "--host-check-port 0" : $"HYDRA_LAUNCHER={launcher}")})"
                : $"hosts: {string.Join(", ", remote)} answer on TCP port {port} ({launcher})");
        return null;
    }

    /// <summary>How to start this same dsattn: the apphost directly, or <c>dotnet dsattn.dll</c>.</summary>
    private static (string Program, string[] Prefix) SelfCommand()
    {
        string? process = Environment.ProcessPath;
        string dll = typeof(LaunchCommand).Assembly.Location;
        if (process is not null && !Path.GetFileNameWithoutExtension(process).Equals("dotnet", StringComparison.OrdinalIgnoreCase))
            return (process, []);
        return (process ?? "dotnet", [dll]);
    }
}
