package tokens

import (
	"math/rand/v2"
	"testing"
)

var fuzzContentTypes = []string{"text/event-stream", "application/x-ndjson", "application/json", "", "text/html"}

// FuzzUsageScanner checks that no input panics, that the figures respect
// their bounds, and that the result does not depend on how the body was
// chunked: whole, cut at one fuzzed point, or in random pieces.
func FuzzUsageScanner(f *testing.F) {
	seeds := []struct {
		d    Dialect
		ep   Endpoint
		ct   int
		body string
	}{
		{DialectOpenAI, EndpointChat, 0, "data: {\"choices\":[{\"delta\":{\"content\":\"中a\"}}],\"usage\":null}\r\n\r\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"prompt_tokens_details\":{\"cached_tokens\":1}}}\n\ndata: [DONE]\n\n"},
		{DialectOpenAI, EndpointResponses, 0, "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"x\"}\n\nevent: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":3,\"output_tokens\":4}}}\n\n"},
		{DialectOpenAI, EndpointEmbedding, 2, `{"data":[{"embedding":[0.1,-2e-3]}],"usage":{"prompt_tokens":8,"total_tokens":8}}`},
		{DialectOpenAI, EndpointChat, 2, `{"choices":[{"message":{"content":"\"usage\": {\"prompt_tokens\": 999999}"}}],"usage":{"prompt_tokens":1}}`},
		{DialectAnthropic, EndpointMessages, 0, "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":10,\"cache_read_input_tokens\":5,\"output_tokens\":1}}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"hi\"}}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":7}}\n\n"},
		{DialectAnthropic, EndpointMessages, 2, `{"type":"message","message":{"usage":{"input_tokens":4}},"usage":{"input_tokens":3,"cache_creation_input_tokens":2,"output_tokens":1}}`},
		{DialectGemini, EndpointStreamGenerate, 2, "[{\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"a\"}]}}],\"usageMetadata\":{\"promptTokenCount\":3}}\n,{\"usageMetadata\":{\"promptTokenCount\":3,\"candidatesTokenCount\":2,\"thoughtsTokenCount\":1}}\n]"},
		{DialectGemini, EndpointStreamGenerate, 0, "data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"한\"}]}}],\"usageMetadata\":{\"promptTokenCount\":\"3\"}}\r\n\r\n"},
		{DialectOllama, EndpointChat, 1, "{\"message\":{\"content\":\"a\"},\"done\":false}\n{\"message\":{\"content\":\"\"},\"done\":true,\"prompt_eval_count\":26,\"eval_count\":3}\n"},
		{DialectOllama, EndpointGenerate, 2, `{"response":"x","done":true,"prompt_eval_count":26,"eval_count":259}`},
		{DialectOpenAI, EndpointChat, 4, `<html>{"usage":{"prompt_tokens":1}}</html>`},
	}
	for _, s := range seeds {
		f.Add(uint8(s.d), uint8(s.ep), uint8(s.ct), []byte(s.body), uint16(17), uint64(1))
	}
	var whole, split UsageScanner
	f.Fuzz(func(t *testing.T, d, ep, ct uint8, body []byte, cut uint16, seed uint64) {
		dl, e, c := Dialect(d%6), Endpoint(ep%8), fuzzContentTypes[int(ct)%len(fuzzContentTypes)]
		whole.Reset(dl, e, c)
		_, _ = whole.Write(body)
		want := whole.Usage()
		if whole.failed {
			t.Fatal("scanner caught a panic")
		}
		for _, v := range []int64{want.InputTokens, want.OutputTokens, want.CacheReadTokens, want.CacheWriteTokens} {
			if v < 0 || v > maxUsageTokens {
				t.Fatalf("figure out of bounds: %+v", want)
			}
		}
		if want.StreamedChars < 0 || want.StreamedCJK < 0 || want.StreamedCJK > want.StreamedChars || want.StreamedChars > 4*int64(len(body)) {
			t.Fatalf("bad text counts %+v for %d bytes", want, len(body))
		}
		if !want.Reported && (want.InputTokens|want.OutputTokens|want.CacheReadTokens|want.CacheWriteTokens) != 0 {
			t.Fatalf("figures without a report: %+v", want)
		}

		k := 0
		if len(body) > 0 {
			k = int(cut) % (len(body) + 1)
		}
		split.Reset(dl, e, c)
		_, _ = split.Write(body[:k])
		_ = split.Usage() // a read mid-stream changes nothing
		_, _ = split.Write(body[k:])
		if got := split.Usage(); got != want {
			t.Fatalf("cut at %d: %+v, whole: %+v", k, got, want)
		}

		r := rand.New(rand.NewPCG(seed, 7))
		split.Reset(dl, e, c)
		for p := body; len(p) > 0; {
			n := min(len(p), 1+r.IntN(16))
			_, _ = split.Write(p[:n])
			p = p[n:]
		}
		if split.failed {
			t.Fatal("scanner caught a panic")
		}
		if got := split.Usage(); got != want {
			t.Fatalf("random pieces (seed %d): %+v, whole: %+v", seed, got, want)
		}
	})
}
