// Command fakellm runs the fake LLM upstream on a fixed address for load
// scripts: it speaks the OpenAI, Azure OpenAI, Anthropic, Gemini and Ollama
// wire formats and enforces its own hidden limits. It runs until
// interrupted, then prints how many requests it saw and refused.
package main

import (
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/llmratelimit/caddy-llm-ratelimit/caddytest/fakellm"
)

func main() {
	var cfg fakellm.Config
	listen := flag.String("listen", "127.0.0.1:9100", "address to listen on")
	flag.IntVar(&cfg.RPM, "rpm", 0, "hidden requests-per-minute limit (0 = unlimited)")
	flag.IntVar(&cfg.Burst, "burst", 0, "request bucket capacity (0 = RPM/60 rounded up, at least 1)")
	flag.IntVar(&cfg.TPM, "tpm", 0, "hidden tokens-per-minute limit (0 = unlimited)")
	flag.IntVar(&cfg.MaxConcurrent, "max-concurrent", 0, "requests in flight before answering 503 (0 = unlimited)")
	flag.BoolVar(&cfg.RateLimitHeaders, "headers", false, "send provider rate-limit and retry-after headers")
	flag.BoolVar(&cfg.RetryAfterOnly, "retry-after-only", false, "send retry-after on 429s and busy 503s, but no rate-limit headers")
	flag.BoolVar(&cfg.NoRetryAfter, "no-retry-after", false, "with -headers: no retry-after on 429s (nor RetryInfo in Gemini bodies)")
	flag.Float64Var(&cfg.FailRate, "fail-rate", 0, "fraction of requests answered with an injected 503 (0..1)")
	flag.Float64Var(&cfg.HangRate, "hang-rate", 0, "fraction of requests that hang until the client leaves (0..1)")
	flag.Uint64Var(&cfg.Seed, "seed", 0, "seed of the generator choosing failed and hung requests")
	flag.IntVar(&cfg.PromptTokens, "prompt-tokens", 0, "prompt tokens reported in usage (0 = body length/4)")
	flag.IntVar(&cfg.CompletionTokens, "completion-tokens", 0, "completion tokens reported in usage (0 = 10)")
	flag.IntVar(&cfg.StreamChunks, "chunks", 0, "content chunks per stream (0 = 3)")
	flag.DurationVar(&cfg.ChunkDelay, "chunk-delay", 0, "pause between stream chunks")
	flag.Parse()

	s, err := fakellm.Listen(*listen, cfg)
	if err != nil {
		log.Fatal(err)
	}
	log.Printf("fakellm listening on %s", s.URL)

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	<-sig
	done := make(chan struct{})
	go func() { s.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		// A stuck client must not keep a load script from finishing.
		log.Print("fakellm: gave up waiting for handlers")
	}
	total, limited := s.Counts()
	fmt.Printf("requests %d, refused by limits %d\n", total, limited)
	st := s.Stats()
	log.Printf("fakellm: ok %d, limited %d, busy %d, failed %d, hung %d, other %d",
		st.OK, st.Limited, st.Busy, st.Failed, st.Hung, st.Other)
}
