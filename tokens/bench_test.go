package tokens

import (
	"strings"
	"testing"
)

// chatBody4K is a realistic ~4 KB chat request: a system prompt, a few
// turns, a tool call and its result, and tool definitions.
var chatBody4K = func() []byte {
	para := "The quick brown fox jumps over the lazy dog while the rate limiter counts every token it sees. "
	var b strings.Builder
	b.WriteString(`{"model":"gpt-4o-2024-08-06","temperature":0.2,"stream":true,"max_completion_tokens":1024,"n":1,`)
	b.WriteString(`"tools":[{"type":"function","function":{"name":"get_weather","description":"Get the weather for a city","parameters":{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}}}],`)
	b.WriteString(`"messages":[{"role":"system","content":"` + strings.Repeat(para, 6) + `"},`)
	for i := 0; i < 8; i++ {
		b.WriteString(`{"role":"user","content":[{"type":"text","text":"` + strings.Repeat(para, 2) + `"}]},`)
		b.WriteString(`{"role":"assistant","content":"` + para + `"},`)
	}
	b.WriteString(`{"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}}]},`)
	b.WriteString(`{"role":"tool","tool_call_id":"call_1","content":"Sunny, 21 \u00b0C, 東京 is cloudy"}]}`)
	return []byte(b.String())
}()

func BenchmarkParse(b *testing.B) {
	p := GetParser()
	defer PutParser(p)
	var req Request
	b.SetBytes(int64(len(chatBody4K)))
	b.ReportAllocs()
	for b.Loop() {
		if err := p.Parse(DialectOpenAI, EndpointChat, "", chatBody4K, &req); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(len(chatBody4K)), "body_bytes")
}

// TestParseSteadyStateAllocs pins the promise that a reused Parser
// allocates only the Model string.
func TestParseSteadyStateAllocs(t *testing.T) {
	p := GetParser()
	defer PutParser(p)
	var req Request
	bodies := []struct {
		d    Dialect
		ep   Endpoint
		pm   string
		body string
	}{
		{DialectOpenAI, EndpointChat, "", string(chatBody4K)},
		{DialectAnthropic, EndpointMessages, "", `{"model":"claude","max_tokens":10,"system":[{"type":"text","text":"s"}],"messages":[{"role":"user","content":[{"type":"text","text":"hi"},{"type":"tool_use","input":{"a":"b"}}]}]}`},
		{DialectGemini, EndpointGenerate, "gemini", `{"contents":[{"parts":[{"text":"hi"},{"functionCall":{"args":{"x":1}}}]}],"generationConfig":{"maxOutputTokens":"5"}}`},
		{DialectOllama, EndpointChat, "", `{"model":"llama","messages":[{"role":"user","content":"hi"}],"options":{"num_predict":5}}`},
		{DialectOpenAI, EndpointResponses, "", `{"model":"o3","instructions":"i","input":[{"role":"user","content":[{"type":"input_text","text":"x"}]}]}`},
	}
	for _, tc := range bodies {
		body := []byte(tc.body)
		wantAllocs := 1.0
		if tc.pm != "" {
			wantAllocs = 0
		}
		_ = p.Parse(tc.d, tc.ep, tc.pm, body, &req) // warm up
		allocs := testing.AllocsPerRun(50, func() {
			if err := p.Parse(tc.d, tc.ep, tc.pm, body, &req); err != nil {
				t.Fatal(err)
			}
		})
		if allocs > wantAllocs {
			t.Errorf("%v/%v: %v allocs per Parse, want ≤ %v", tc.d, tc.ep, allocs, wantAllocs)
		}
	}
}
