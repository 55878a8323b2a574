using BenchmarkDotNet.Running;

// dotnet run -c Release --project benchmarks/Distributed.Benchmarks -- --filter '*Flash*'
BenchmarkSwitcher.FromAssembly(typeof(Distributed.Benchmarks.Perf_FlashAttention).Assembly).Run(args);
