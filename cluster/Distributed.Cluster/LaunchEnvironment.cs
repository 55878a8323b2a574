using System.Globalization;

namespace Distributed.Cluster;

/// <summary>How this process was started.</summary>
public enum LaunchKind
{
    /// <summary>Not under an MPI launcher: the caller runs in-process ranks.</summary>
    None,
    /// <summary>MPICH's hydra (<c>PMI_RANK</c>/<c>PMI_SIZE</c>): use <see cref="MpiCommunicator"/>.</summary>
    Mpich,
    /// <summary>Open MPI's mpiexec (<c>OMPI_COMM_WORLD_*</c>): refused, its ABI is not MPICH's.</summary>
    OpenMpi,
}

/// <summary>What the environment says about an MPI launch, read before MPI is initialised.</summary>
/// <param name="Kind">Which launcher started this process, if any.</param>
/// <param name="Rank">World rank from the launcher, or 0.</param>
/// <param name="Size">World size from the launcher, or 1.</param>
/// <param name="LocalRank">Rank among the ranks of this host (MPICH's <c>MPI_LOCALRANKID</c>), or -1 when unknown.</param>
/// <param name="LocalSize">Ranks on this host (<c>MPI_LOCALNRANKS</c>), or -1 when unknown.</param>
public sealed record LaunchEnvironment(LaunchKind Kind, int Rank, int Size, int LocalRank, int LocalSize)
{
    /// <summary>Reads the launcher's environment variables of this process.</summary>
    public static LaunchEnvironment Detect() => Detect(Environment.GetEnvironmentVariable);

    /// <summary>Reads the launcher's variables through <paramref name="get"/> (tests pass a dictionary).</summary>
    public static LaunchEnvironment Detect(Func<string, string?> get)
    {
        ArgumentNullException.ThrowIfNull(get);
        int Int(string name, int fallback) =>
            int.TryParse(get(name), NumberStyles.Integer, CultureInfo.InvariantCulture, out int v) ? v : fallback;
        if (get("OMPI_COMM_WORLD_SIZE") is not null)
            return new LaunchEnvironment(LaunchKind.OpenMpi, Int("OMPI_COMM_WORLD_RANK", 0), Int("OMPI_COMM_WORLD_SIZE", 1),
                Int("OMPI_COMM_WORLD_LOCAL_RANK", -1), Int("OMPI_COMM_WORLD_LOCAL_SIZE", -1));
        if (get("PMI_RANK") is not null && get("PMI_SIZE") is not null)
            return new LaunchEnvironment(LaunchKind.Mpich, Int("PMI_RANK", 0), Int("PMI_SIZE", 1), Int("MPI_LOCALRANKID", -1), Int("MPI_LOCALNRANKS", -1));
        return new LaunchEnvironment(LaunchKind.None, 0, 1, -1, -1);
    }
}
