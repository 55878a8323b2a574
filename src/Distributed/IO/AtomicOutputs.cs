using System.Security.Cryptography;

namespace Distributed.IO;

/// <summary>
/// The output files of one job, written through temporaries so that a failed job never leaves a partial or
/// mixed file at a target path. Each target <c>dir/name</c> is written as <c>dir/.name.dsattn-{jobId}.tmp</c>
/// (see <see cref="TempPath"/>); <see cref="Commit"/> renames every temporary onto its target, and
/// <see cref="Abort"/> deletes them.
/// </summary>
/// <remarks>
/// <para>Use in a multi-rank job: every rank constructs the set with the same targets and the same job id (one
/// rank draws it with <see cref="NewJobId"/> and shares it); one rank calls <see cref="Prepare"/> and creates
/// each temporary (e.g. <see cref="NpyWriter.Create"/>); after a barrier the others open them
/// (<see cref="NpyWriter.Open"/>) and write their parts.</para>
/// <para>The caller must call <see cref="Commit"/> (on one rank) only after a collective verdict that every rank
/// succeeded — e.g. an all-reduce of a success flag after every rank has written and closed its files — and
/// <see cref="Abort"/> otherwise. Each rename is atomic, but the set is not: if <see cref="Commit"/> itself
/// fails part way, the targets already renamed hold the new data.</para>
/// <para>Two jobs writing the same target at the same time are not supported: <see cref="Prepare"/> treats every
/// other job's temporary for a target as stale and deletes it.</para>
/// </remarks>
public sealed class AtomicOutputs
{
    private const string Marker = ".dsattn-";
    private const string Suffix = ".tmp";

    private readonly string[] _targets;
    private readonly string[] _labels;

    /// <summary>Creates the output set; nothing is touched on disk.</summary>
    /// <param name="targets">The final output paths (relative paths resolve against the current folder).</param>
    /// <param name="jobId">The job's id, shared by all its ranks: 1–64 characters of letters, digits, '-' and '_'.</param>
    /// <param name="optionNames">Optional: the option that named each target (e.g. <c>--out</c>), used in messages.</param>
    /// <exception cref="ArgumentException">An invalid job id, an empty or duplicated target, or a mismatched option list.</exception>
    public AtomicOutputs(IReadOnlyList<string> targets, string jobId, IReadOnlyList<string>? optionNames = null)
    {
        ArgumentNullException.ThrowIfNull(targets);
        ArgumentException.ThrowIfNullOrEmpty(jobId);
        if (!IsJobId(jobId))
            throw new ArgumentException($"Job id '{jobId}' must be 1-64 letters, digits, '-' or '_'.", nameof(jobId));
        if (optionNames is not null && optionNames.Count != targets.Count)
            throw new ArgumentException($"{optionNames.Count} option names for {targets.Count} targets.", nameof(optionNames));
        _targets = new string[targets.Count];
        _labels = new string[targets.Count];
        for (int i = 0; i < targets.Count; i++)
        {
            ArgumentException.ThrowIfNullOrEmpty(targets[i], nameof(targets));
            _targets[i] = Path.GetFullPath(targets[i]);
            if (Path.GetFileName(_targets[i]).Length == 0)
                throw new ArgumentException($"Output path '{targets[i]}' names a folder, not a file.", nameof(targets));
            _labels[i] = optionNames is null ? targets[i] : $"{optionNames[i]} {targets[i]}";
            for (int j = 0; j < i; j++)
                if (string.Equals(_targets[i], _targets[j], StringComparison.Ordinal))
                    throw new ArgumentException($"{_labels[i]} is the same file as {_labels[j]}; give each output its own path.", nameof(targets));
        }
        JobId = jobId;
    }

    /// <summary>The job id every temporary name carries.</summary>
    public string JobId { get; }

    /// <summary>The targets, as full paths, in the given order.</summary>
    public IReadOnlyList<string> Targets => _targets;

    /// <summary>A fresh random job id (16 lowercase hex digits); draw it once per job and share it between ranks.</summary>
    public static string NewJobId() => Convert.ToHexStringLower(RandomNumberGenerator.GetBytes(8));

    /// <summary>The temporary file for <paramref name="target"/>: <c>.{name}.dsattn-{jobId}.tmp</c> in the target's folder.</summary>
    /// <param name="target">One of the targets (any spelling of the same path).</param>
    /// <exception cref="ArgumentException"><paramref name="target"/> is not in the set.</exception>
    public string TempPath(string target)
    {
        ArgumentException.ThrowIfNullOrEmpty(target);
        string full = Path.GetFullPath(target);
        if (Array.IndexOf(_targets, full) < 0)
            throw new ArgumentException($"'{target}' is not one of this job's outputs.", nameof(target));
        return TempOf(full);
    }

    /// <summary>
    /// Checks that every target's folder exists and is writable (see <see cref="CheckWritable(IReadOnlyList{string}, IReadOnlyList{string}?)"/>) and deletes the
    /// stale temporaries that other jobs left for the same targets (<c>.{name}.dsattn-*.tmp</c> with another id).
    /// Call on one rank before the temporaries are created.
    /// </summary>
    /// <exception cref="IOException">A folder is missing or not writable, or a target is a folder; the message names the option, the path and the fix.</exception>
    public void Prepare()
    {
        for (int i = 0; i < _targets.Length; i++)
        {
            CheckWritable(_targets[i], _labels[i]);
            string dir = Path.GetDirectoryName(_targets[i])!;
            string prefix = "." + Path.GetFileName(_targets[i]) + Marker;
            foreach (string file in Directory.EnumerateFiles(dir))
            {
                string name = Path.GetFileName(file);
                if (!name.StartsWith(prefix, StringComparison.Ordinal) || !name.EndsWith(Suffix, StringComparison.Ordinal)
                    || name.Length <= prefix.Length + Suffix.Length)
                    continue;
                string id = name[prefix.Length..^Suffix.Length];
                if (IsJobId(id) && id != JobId)
                    DeleteIfPresent(file);
            }
        }
    }

    /// <summary>
    /// Checks that the folder of each target exists and that a file can be created in it (by creating and
    /// deleting a probe file), and that no target is a folder.
    /// </summary>
    /// <param name="targets">The output paths.</param>
    /// <param name="optionNames">Optional: the option that named each target, used in messages.</param>
    /// <exception cref="IOException">A folder is missing or not writable, or a target is a folder.</exception>
    public static void CheckWritable(IReadOnlyList<string> targets, IReadOnlyList<string>? optionNames = null)
    {
        ArgumentNullException.ThrowIfNull(targets);
        for (int i = 0; i < targets.Count; i++)
            CheckWritable(Path.GetFullPath(targets[i]), optionNames is null ? targets[i] : $"{optionNames[i]} {targets[i]}");
    }

    private static void CheckWritable(string full, string label)
    {
        string dir = Path.GetDirectoryName(full) ?? full;
        if (!Directory.Exists(dir))
            throw new IOException($"{label}: the folder {dir} does not exist; create it or choose another output path.");
        if (Directory.Exists(full))
            throw new IOException($"{label}: {full} is a folder; give a file path.");
        string probe = Path.Combine(dir, $".dsattn-probe-{NewJobId()}{Suffix}");
        try
        {
            using (new FileStream(probe, FileMode.CreateNew, FileAccess.Write, FileShare.None, 1, FileOptions.None))
            {
            }
            File.Delete(probe);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new IOException($"{label}: cannot create files in the folder {dir} ({e.Message}); make it writable or choose another output path.", e);
        }
    }

    /// <summary>
    /// Renames every temporary onto its target (replacing an existing target), in the given order. Call on one
    /// rank, and only after every rank has reported success.
    /// </summary>
    /// <exception cref="IOException">A temporary is missing (it was never created, or another job's <see cref="Prepare"/> deleted it) or cannot be renamed.</exception>
    public void Commit()
    {
        for (int i = 0; i < _targets.Length; i++)
        {
            string temp = TempOf(_targets[i]);
            try
            {
                File.Move(temp, _targets[i], overwrite: true);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                throw new IOException($"{_labels[i]}: could not rename the finished temporary {temp} onto {_targets[i]} ({e.Message}).", e);
            }
        }
    }

    /// <summary>Deletes every temporary of this job (missing ones are fine); targets are never touched.</summary>
    public void Abort()
    {
        foreach (string target in _targets)
            DeleteIfPresent(TempOf(target));
    }

    private string TempOf(string fullTarget) =>
        Path.Combine(Path.GetDirectoryName(fullTarget)!, "." + Path.GetFileName(fullTarget) + Marker + JobId + Suffix);

    private static void DeleteIfPresent(string path)
    {
        try
        {
            File.Delete(path);
        }
        catch (DirectoryNotFoundException)
        {
        }
    }

    private static bool IsJobId(string id) =>
        id.Length is > 0 and <= 64 && id.All(c => char.IsAsciiLetterOrDigit(c) || c is '-' or '_');
}
