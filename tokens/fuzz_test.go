package tokens

import (
	"encoding/json"
	"testing"
	"unicode/utf8"
)

func jsonValid(s string) bool { return json.Valid([]byte(s)) }

// FuzzParse checks that Parse never panics and that what it returns always
// respects the documented bounds, and that the validator agrees with
// encoding/json.
func FuzzParse(f *testing.F) {
	f.Add(uint8(DialectOpenAI), uint8(EndpointChat), "", `{"model":"gpt-4o","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],"stream":true,"max_completion_tokens":100,"n":2}`)
	f.Add(uint8(DialectOpenAI), uint8(EndpointResponses), "", `{"model":"o3","input":[{"role":"user","content":"x"}],"max_output_tokens":5}`)
	f.Add(uint8(DialectOpenAI), uint8(EndpointEmbedding), "", `{"model":"e","input":[[1,2],[3]]}`)
	f.Add(uint8(DialectAzure), uint8(EndpointChat), "deploy", `{"messages":[{"role":"user","content":"x"}],"max_tokens":1e3}`)
	f.Add(uint8(DialectAnthropic), uint8(EndpointMessages), "", `{"model":"claude","max_tokens":1024,"system":[{"type":"text","text":"s"}],"messages":[{"role":"user","content":[{"type":"tool_use","input":{"a":"b"}}]}]}`)
	f.Add(uint8(DialectGemini), uint8(EndpointStreamGenerate), "gemini-2.0-flash", `{"contents":[{"parts":[{"text":"中文"}]}],"generationConfig":{"maxOutputTokens":"64","candidateCount":0}}`)
	f.Add(uint8(DialectOllama), uint8(EndpointChat), "", `{"model":"llama3","messages":[{"role":"user","content":"x"}],"options":{"num_predict":-1}}`)
	f.Add(uint8(DialectOllama), uint8(EndpointGenerate), "", `{"model":"m","prompt":"p","context":[1,2],"stream":null}`)
	f.Add(uint8(DialectUnknown), uint8(EndpointUnknown), "", "{\"model\":\"\xff\xfe\",\"n\":-0.0e1}")
	f.Fuzz(func(t *testing.T, d, ep uint8, pathModel, body string) {
		p := GetParser()
		defer PutParser(p)
		var req Request
		err := p.Parse(Dialect(d%6), Endpoint(ep%8), pathModel, []byte(body), &req)
		if err != nil {
			if _, ok := err.(*ParseError); !ok {
				t.Fatalf("error %T is not a *ParseError", err)
			}
			if _, perr := validateJSON([]byte(body)); perr == nil && !jsonValid(body) {
				t.Fatalf("validator accepted invalid JSON %q", body)
			}
			return
		}
		if !jsonValid(body) {
			t.Fatalf("accepted invalid JSON %q", body)
		}
		if !utf8.ValidString(req.Model) || len(req.Model) > MaxModelLen {
			t.Fatalf("bad model %q", req.Model)
		}
		if req.Choices < 1 || req.MaxOutputTokens < 0 || req.PromptChars < 0 || req.PromptCJK < 0 || req.PromptCJK > req.PromptChars {
			t.Fatalf("bad request %+v", req)
		}
	})
}

// FuzzValidate compares the validator with encoding/json on arbitrary
// input; only the nesting limit may make them differ.
func FuzzValidate(f *testing.F) {
	for _, s := range []string{`{"a":[1,2.5e3,"x\u00e9",true,null]}`, `[01]`, `"\ud800"`, "\"\x00\""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		_, perr := validateJSON([]byte(s))
		if got, want := perr == nil, jsonValid(s); got != want && perr != errTooDeep {
			t.Fatalf("validateJSON(%q) valid = %v, encoding/json says %v (%v)", s, got, want, perr)
		}
	})
}
