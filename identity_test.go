package llmratelimit

import (
	"strconv"
	"strings"
	"testing"
	"unicode/utf8"
)

func TestParseMetadata(t *testing.T) {
	for _, tc := range []struct {
		name, header string
		want         []metaPair
		why          string
	}{
		{"empty", "", nil, ""},
		{"object", `{"env":"prod","project_id":"p-42"}`, []metaPair{{"env", "prod"}, {"project_id", "p-42"}}, ""},
		{"non-string values skipped", `{"env":"prod","n":5,"o":{"a":"b"},"l":["x"],"t":true,"z":null}`, []metaPair{{"env", "prod"}}, ""},
		{"escaped", `{"k\u00e9":"v\"1"}`, []metaPair{{"ké", `v"1`}}, ""},
		{"not json", `env=prod`, nil, "not valid JSON"},
		{"array", `["env","prod"]`, nil, "not a JSON object"},
		{"string", `"prod"`, nil, "not a JSON object"},
		{"truncated", `{"env":"pr`, nil, "not valid JSON"},
		{"too large", `{"a":"` + strings.Repeat("x", 5000) + `"}`, nil, "too large"},
		{"deep", strings.Repeat(`{"a":`, 2000) + `"x"` + strings.Repeat("}", 2000), nil, "too large"},
		{"deep but small", strings.Repeat(`{"a":`, 400) + `"x"` + strings.Repeat("}", 400), nil, "not valid JSON"},
		{"long value skipped", `{"a":"` + strings.Repeat("x", 300) + `","b":"c"}`, []metaPair{{"b", "c"}}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, why := parseMetadata(nil, tc.header)
			if !strings.Contains(why, tc.why) || (tc.why == "") != (why == "") {
				t.Fatalf("why = %q, want %q", why, tc.why)
			}
			if len(got) != len(tc.want) {
				t.Fatalf("got %v, want %v", got, tc.want)
			}
			for i := range got {
				if got[i] != tc.want[i] {
					t.Fatalf("got %v, want %v", got, tc.want)
				}
			}
		})
	}
	many := "{"
	for i := 0; i < 100; i++ {
		if i > 0 {
			many += ","
		}
		many += `"k` + strconv.Itoa(i) + `":"v"`
	}
	many += "}"
	if got, _ := parseMetadata(nil, many); len(got) != maxMetadataPairs {
		t.Fatalf("kept %d pairs, want %d", len(got), maxMetadataPairs)
	}
}

// FuzzMetadataHeader: whatever a client puts in the metadata header, parsing
// returns, keeps within its bounds, and never panics.
func FuzzMetadataHeader(f *testing.F) {
	for _, s := range []string{`{"env":"prod"}`, `{"a":{"b":"c"}}`, `[1,2]`, `{"a":"\ud800"}`, "{\"a\":\"\xff\"}", `{`, ``, `{"a":"b","a":"c"}`} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, header string) {
		got, why := parseMetadata(nil, header)
		if why != "" && len(got) != 0 {
			t.Fatalf("pairs %v with reason %q", got, why)
		}
		if len(got) > maxMetadataPairs {
			t.Fatalf("%d pairs", len(got))
		}
		for _, p := range got {
			if len(p.key) > maxMetadataValue || len(p.value) > maxMetadataValue {
				t.Fatalf("pair too long: %d/%d", len(p.key), len(p.value))
			}
			_ = utf8.ValidString(p.value)
		}
	})
}
