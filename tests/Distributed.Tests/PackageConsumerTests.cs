using System.IO.Compression;
using System.Text.RegularExpressions;
using Distributed.Cluster;
using Xunit;
using Xunit.Abstractions;

namespace Distributed.Tests;

/// <summary>
/// The NuGet packages as a user meets them: <c>dotnet pack</c> of the solution gives exactly the three library
/// packages, each with its XML docs and README; a fresh console project restores them from a local folder feed
/// and runs the README's training-loop example (taken from README.md itself) on 2 in-process ranks.
/// </summary>
public sealed partial class PackageConsumerTests(ITestOutputHelper output)
{
    private static readonly TimeSpan Limit = TimeSpan.FromMinutes(6);

    [Fact]
    public void Pack_GivesTheThreeLibraries_AndAFreshProjectRunsTheReadmeTrainingLoopFromThem()
    {
        string root = RepositoryRoot();
        string example = ReadmeExample(root);
        string work = Path.Combine(Path.GetTempPath(), "dsattn-pack-" + Guid.NewGuid().ToString("N")[..12]);
        string feed = Path.Combine(work, "feed"), app = Path.Combine(work, "app");
        // A version of its own, so the global package cache never serves an older build of these packages.
        string version = $"0.0.0-test.{DateTime.UtcNow:yyyyMMddHHmmss}.{Environment.ProcessId}";
        string configuration = AppContext.BaseDirectory.Contains($"{Path.DirectorySeparatorChar}Debug{Path.DirectorySeparatorChar}", StringComparison.Ordinal) ? "Debug" : "Release";
        Directory.CreateDirectory(app);
        try
        {
            var pack = Dotnet(root, "pack", Path.Combine(root, "Distributed.sln"), "-c", configuration, "--no-build", "-o", feed, "-nologo", $"-p:PackageVersion={version}");
            Assert.True(pack.ExitCode == 0, $"dotnet pack failed:\n{pack.Stdout}\n{pack.Stderr}");
            var packages = Directory.GetFiles(feed, "*.nupkg").Select(f => Path.GetFileName(f)!).Order(StringComparer.Ordinal).ToArray();
            Assert.Equal(new[] { $"Distributed.{version}.nupkg", $"Distributed.Cluster.{version}.nupkg", $"Distributed.Kernels.{version}.nupkg" }, packages);
            foreach (var id in new[] { "Distributed", "Distributed.Cluster", "Distributed.Kernels" })
            {
                using var zip = ZipFile.OpenRead(Path.Combine(feed, $"{id}.{version}.nupkg"));
                var names = zip.Entries.Select(e => e.FullName).ToHashSet();
                Assert.Contains($"lib/net10.0/{id}.dll", names);
                Assert.Contains($"lib/net10.0/{id}.xml", names);
                Assert.Contains("README.md", names);
                using var readme = new StreamReader(zip.GetEntry("README.md")!.Open());
                Assert.Contains("MPICH", readme.ReadToEnd(), StringComparison.Ordinal);
            }

            File.WriteAllText(Path.Combine(app, "Program.cs"), example);
            File.WriteAllText(Path.Combine(app, "App.csproj"), $"""
                <Project Sdk="Microsoft.NET.Sdk">
                  <PropertyGroup>
                    <OutputType>Exe</OutputType>
                    <TargetFramework>net10.0</TargetFramework>
                    <Nullable>enable</Nullable>
                    <ImplicitUsings>enable</ImplicitUsings>
                    <TreatWarningsAsErrors>true</TreatWarningsAsErrors>
                  </PropertyGroup>
                  <ItemGroup>
                    <PackageReference Include="Distributed" Version="{version}" />
                  </ItemGroup>
                </Project>
                """);
            // The local feed is added to the machine's sources (ILGPU, MPI.NET and gRPC come from there).
            File.WriteAllText(Path.Combine(app, "nuget.config"), $"""
                <?xml version="1.0" encoding="utf-8"?>
                <configuration>
                  <packageSources>
                    <add key="local" value="{feed}" />
                  </packageSources>
                </configuration>
                """);
            // Directory.Build.props of this repository must not leak in: the app lives outside it (in the temp folder).
            var run = Dotnet(app, "run", "-c", "Release");
            Assert.True(run.ExitCode == 0, $"the README example failed:\n{run.Stdout}\n{run.Stderr}");
            var losses = LossLine().Matches(run.Stdout).Select(m => double.Parse(m.Groups[2].Value, System.Globalization.CultureInfo.InvariantCulture)).ToArray();
            Assert.Equal(5, losses.Length);
            Assert.True(losses[^1] < losses[0], $"the example's loss did not go down: {string.Join(", ", losses)}");
        }
        finally
        {
            try { Directory.Delete(work, recursive: true); } catch (IOException) { }
            string cache = Environment.GetEnvironmentVariable("NUGET_PACKAGES") ?? Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".nuget", "packages");
            foreach (var id in new[] { "distributed", "distributed.cluster", "distributed.kernels" })
            {
                var dir = Path.Combine(cache, id, version);
                try { if (Directory.Exists(dir)) Directory.Delete(dir, recursive: true); } catch (IOException) { }
            }
        }
    }

    [Fact]
    public void TheReadmeExample_IsTheOneThisTestRuns()
    {
        // The marker and the code block exist, and the code is a complete program using the training API.
        string example = ReadmeExample(RepositoryRoot());
        Assert.Contains("attention.Forward(", example, StringComparison.Ordinal);
        Assert.Contains("accumulate:", example, StringComparison.Ordinal);
        Assert.Contains("RankRunner.Run(", example, StringComparison.Ordinal);
    }

    private LaunchResult Dotnet(string directory, params string[] args)
    {
        // Variables that a test host inherits from `dotnet test` and that would point a nested build at its MSBuild.
        var env = new Dictionary<string, string?>
        {
            ["MSBuildExtensionsPath"] = null, ["MSBUILD_EXE_PATH"] = null, ["MSBuildSDKsPath"] = null,
            ["MSBuildLoadMicrosoftTargetsReadOnly"] = null, ["DOTNET_CLI_TELEMETRY_OPTOUT"] = "1", ["DOTNET_NOLOGO"] = "1",
        };
        var all = new List<string>(args);
        if (args[0] != "pack") all.AddRange(["--project", directory]);
        var r = MpiLauncher.Run("dotnet", all, Limit, null, env);
        output.WriteLine($"dotnet {string.Join(' ', all)}: exit {r.ExitCode} after {r.Elapsed.TotalSeconds:F1} s\n{r.Stdout}\n{r.Stderr}");
        Assert.False(r.TimedOut, $"dotnet {args[0]} took longer than {Limit.TotalMinutes} min");
        return r;
    }

    private static string RepositoryRoot()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
            if (File.Exists(Path.Combine(dir.FullName, "Distributed.sln"))) return dir.FullName;
        throw new InvalidOperationException($"No Distributed.sln above {AppContext.BaseDirectory}.");
    }

    /// <summary>The C# block that follows the README's training-loop marker.</summary>
    private static string ReadmeExample(string root)
    {
        string readme = File.ReadAllText(Path.Combine(root, "README.md"));
        var m = ExampleBlock().Match(readme);
        Assert.True(m.Success, "README.md has no '<!-- example: training-loop' marker followed by a ```csharp block.");
        return m.Groups[1].Value;
    }

    [GeneratedRegex(@"<!-- example: training-loop[^\n]*-->\s*```csharp\n(.*?)\n```", RegexOptions.Singleline)]
    private static partial Regex ExampleBlock();

    [GeneratedRegex(@"^step (\d+) loss ([0-9.eE+-]+)", RegexOptions.Multiline)]
    private static partial Regex LossLine();
}
