using System.Globalization;

namespace Distributed.Cluster;

/// <summary>One line of a hostfile: a host and how many ranks it takes.</summary>
/// <param name="Host">Host name or address.</param>
/// <param name="Slots">Ranks to place on the host (1 when the line does not say).</param>
/// <param name="Line">1-based line number in the file.</param>
public sealed record HostfileEntry(string Host, int Slots, int Line);

/// <summary>A malformed hostfile line; the message names file:line and the reason.</summary>
public sealed class HostfileFormatException : FormatException
{
    /// <summary>Creates the exception.</summary>
    public HostfileFormatException(string source, int line, string reason)
        : base($"{source}:{line}: {reason}")
    {
        SourceName = source;
        Line = line;
    }

    /// <summary>The file (or name) the text came from.</summary>
    public string SourceName { get; }

    /// <summary>1-based line number.</summary>
    public int Line { get; }
}

/// <summary>
/// A hostfile in either form: MPICH hydra (<c>host</c> or <c>host:slots</c>) or Open MPI
/// (<c>host slots=N</c>, optionally <c>max_slots=M</c>). <c>#</c> starts a comment; blank lines are ignored.
/// </summary>
public sealed class Hostfile
{
    private Hostfile(string source, IReadOnlyList<HostfileEntry> entries)
    {
        SourceName = source;
        Entries = entries;
    }

    /// <summary>Where the text came from (the path).</summary>
    public string SourceName { get; }

    /// <summary>The hosts in file order.</summary>
    public IReadOnlyList<HostfileEntry> Entries { get; }

    /// <summary>Σ slots over the hosts.</summary>
    public int TotalSlots => Entries.Sum(e => e.Slots);

    /// <summary>Reads and parses a hostfile.</summary>
    /// <exception cref="FileNotFoundException">The file does not exist.</exception>
    /// <exception cref="HostfileFormatException">A line is malformed (file:line and reason).</exception>
    public static Hostfile Parse(string path)
    {
        ArgumentNullException.ThrowIfNull(path);
        if (!File.Exists(path)) throw new FileNotFoundException($"Hostfile '{path}' does not exist. See hostfile.example for the format.", path);
        return ParseText(File.ReadAllText(path), path);
    }

    /// <summary>Parses hostfile text; <paramref name="sourceName"/> appears in error messages.</summary>
    /// <exception cref="HostfileFormatException">A line is malformed, the slots add up to more than int.MaxValue, or
    /// there is no host at all.</exception>
    public static Hostfile ParseText(string text, string sourceName)
    {
        ArgumentNullException.ThrowIfNull(text);
        var entries = new List<HostfileEntry>();
        long total = 0;
        string[] lines = text.Split('\n');
        for (int i = 0; i < lines.Length; i++)
        {
            int lineNo = i + 1;
            string line = lines[i];
            int hash = line.IndexOf('#', StringComparison.Ordinal);
            if (hash >= 0) line = line[..hash];
            line = line.Trim();
            if (line.Length == 0) continue;
            string[] parts = line.Split((char[]?)null, StringSplitOptions.RemoveEmptyEntries);
            string host = parts[0];
            int slots = 1;
            if (parts.Length == 1 && host.Contains(':', StringComparison.Ordinal))
            {
                // hydra form host:slots (an IPv6 address would need brackets; hydra has none, so refuse).
                int colon = host.LastIndexOf(':');
                string count = host[(colon + 1)..];
                host = host[..colon];
                if (host.Length == 0) throw new HostfileFormatException(sourceName, lineNo, $"missing host name before ':' in '{lines[i].Trim()}'.");
                slots = ParseSlots(count, sourceName, lineNo, "after ':'");
            }
            else if (parts.Length > 1)
            {
                bool sawSlots = false;
                foreach (string p in parts.Skip(1))
                {
                    int eq = p.IndexOf('=', StringComparison.Ordinal);
                    string keyName = eq < 0 ? p : p[..eq];
                    if (eq < 0 || (keyName != "slots" && keyName != "max_slots" && keyName != "max-slots"))
                        throw new HostfileFormatException(sourceName, lineNo, $"unexpected '{p}'; use 'host', 'host:slots' (MPICH) or 'host slots=N' (Open MPI).");
                    int v = ParseSlots(p[(eq + 1)..], sourceName, lineNo, $"in '{p}'");
                    if (keyName == "slots") { slots = v; sawSlots = true; }
                    else if (!sawSlots) slots = v;
                }
            }
            if (host.Contains(':', StringComparison.Ordinal) || host.Contains('=', StringComparison.Ordinal))
                throw new HostfileFormatException(sourceName, lineNo, $"'{host}' is not a host name.");
            total += slots;
            if (total > int.MaxValue)
                throw new HostfileFormatException(sourceName, lineNo, $"the slots up to this line add up to {total}, more than the {int.MaxValue} ranks one job can have; give smaller slot counts.");
            entries.Add(new HostfileEntry(host, slots, lineNo));
        }
        if (entries.Count == 0) throw new HostfileFormatException(sourceName, Math.Max(1, lines.Length), "the hostfile names no host.");
        return new Hostfile(sourceName, entries);
    }

    /// <summary>
    /// The hosts whose names do not resolve (DNS or /etc/hosts), each with its line and the resolver's reason, looked
    /// up in parallel within <paramref name="timeout"/> (a lookup still running then counts as failed). mpiexec
    /// would otherwise start the reachable ranks, which then wait in MPI_Init for the ranks that never start: a
    /// launcher calls this first and refuses the job. <see cref="HostReachability.Find"/> also probes each non-local host's launcher port.
    /// </summary>
    public IReadOnlyList<(HostfileEntry Entry, string Reason)> FindUnresolvableHosts(TimeSpan timeout)
    {
        var lookups = Entries.Select(e => (Entry: e, Task: System.Net.Dns.GetHostAddressesAsync(e.Host))).ToList();
        try { Task.WaitAll([.. lookups.Select(l => (Task)l.Task)], timeout); }
        catch (AggregateException) { } // failures are read per lookup below
        var bad = new List<(HostfileEntry, string)>();
        foreach (var (entry, task) in lookups)
        {
            if (!task.IsCompleted) bad.Add((entry, $"the name lookup took more than {timeout.TotalSeconds:0.#} s"));
            else if (task.IsFaulted) bad.Add((entry, task.Exception?.InnerException?.Message ?? "the name does not resolve"));
            else if (task.Result.Length == 0) bad.Add((entry, "the name resolves to no address"));
        }
        return bad;
    }

    /// <summary>The file in MPICH hydra form (<c>host:slots</c> per line), which <c>mpiexec -f</c> reads.</summary>
    public string ToHydraText() => string.Concat(Entries.Select(e => $"{e.Host}:{e.Slots.ToString(CultureInfo.InvariantCulture)}\n"));

    private static int ParseSlots(string text, string source, int line, string where)
    {
        if (!int.TryParse(text, NumberStyles.None, CultureInfo.InvariantCulture, out int v) || v < 1)
            throw new HostfileFormatException(source, line, $"slot count '{text}' {where} must be a whole number ≥ 1.");
        return v;
    }
}
