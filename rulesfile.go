package llmratelimit

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
	"go.yaml.in/yaml/v3"

	"github.com/llmratelimit/caddy-llm-ratelimit/bucket"
)

// rulesFileType is what seed 003's rate-limiting config declares as its
// type; a file without it is some other YAML.
const rulesFileType = "gateway-rate-limiting-config"

// maxRulesFileSize bounds what is read of a rules file, so that a path
// pointing at the wrong thing (a log, /dev/zero) fails instead of filling
// the memory. Ten thousand rules take about 2 MiB.
const maxRulesFileSize = 16 << 20

// rulesFile is a loaded rules file.
type rulesFile struct {
	// name is the file's own name field, for the logs.
	name  string
	rules []Rule
}

// withFileRules returns the handler's own rules followed by those of its
// rules file, if it has one.
func (h *Handler) withFileRules() ([]Rule, error) {
	if h.RulesFile == "" {
		return h.Rules, nil
	}
	path := caddy.NewReplacer().ReplaceKnown(h.RulesFile, "")
	rf, err := readRulesFile(path, h.Rules)
	if err != nil {
		return nil, err
	}
	if h.logger != nil {
		h.logger.Info("loaded rules file", zap.String("path", path), zap.String("name", rf.name), zap.Int("rules", len(rf.rules)))
	}
	// Clipped, so that appending never writes into the configured slice.
	return append(slices.Clip(h.Rules), rf.rules...), nil
}

// readRulesFile reads and parses the rules file at path. existing are the
// rules configured otherwise, whose ids the file's must not repeat.
func readRulesFile(path string, existing []Rule) (*rulesFile, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("rules_file: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("rules_file: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("rules_file %s: not a regular file", path)
	}
	data, err := io.ReadAll(io.LimitReader(f, maxRulesFileSize+1))
	if err != nil {
		return nil, fmt.Errorf("rules_file: %w", err)
	}
	if len(data) > maxRulesFileSize {
		return nil, fmt.Errorf("rules_file %s: larger than %d MiB", path, maxRulesFileSize>>20)
	}
	return parseRulesFile(path, data, existing)
}

// rulesFileError is a mistake at a place in a rules file.
type rulesFileError struct {
	path      string
	line, col int
	msg       string
}

func (e *rulesFileError) Error() string {
	switch {
	case e.line > 0 && e.col > 0:
		return fmt.Sprintf("rules_file %s:%d:%d: %s", e.path, e.line, e.col, e.msg)
	case e.line > 0:
		return fmt.Sprintf("rules_file %s:%d: %s", e.path, e.line, e.msg)
	}
	return fmt.Sprintf("rules_file %s: %s", e.path, e.msg)
}

// rulesParser walks a rules file's YAML nodes, which know their lines.
// Decoding into structs would lose the lines of everything but syntax
// errors and unknown keys.
type rulesParser struct {
	path string
	// what prefixes messages about the rule being read: `rule "ID": `.
	what string
}

func (p *rulesParser) errf(n *yaml.Node, format string, args ...any) error {
	return &rulesFileError{path: p.path, line: n.Line, col: n.Column, msg: p.what + fmt.Sprintf(format, args...)}
}

// yamlLine finds the line in the YAML package's syntax errors.
var yamlLine = regexp.MustCompile(`^yaml: line (\d+): (.*)$`)

func (p *rulesParser) syntaxErr(err error) error {
	msg := err.Error()
	if m := yamlLine.FindStringSubmatch(msg); m != nil {
		line, _ := strconv.Atoi(m[1])
		return &rulesFileError{path: p.path, line: line, msg: "invalid YAML: " + m[2]}
	}
	return &rulesFileError{path: p.path, msg: "invalid YAML: " + strings.TrimPrefix(msg, "yaml: ")}
}

// parseRulesFile parses a rules file's contents; path is for messages.
func parseRulesFile(path string, data []byte, existing []Rule) (*rulesFile, error) {
	p := &rulesParser{path: path}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, &rulesFileError{path: path, msg: fmt.Sprintf("the file is empty: want type: %s and rules", rulesFileType)}
		}
		return nil, p.syntaxErr(err)
	}
	var more yaml.Node
	if err := dec.Decode(&more); err == nil {
		return nil, p.errf(docContent(&more), "a second YAML document: a rules file holds one")
	} else if !errors.Is(err, io.EOF) {
		return nil, p.syntaxErr(err)
	}
	root := docContent(&doc)
	if root.Kind != yaml.MappingNode {
		return nil, p.errf(root, "not a YAML mapping: want name, type and rules at the top level, got %s", kindName(root))
	}
	keys, err := p.mapping(root)
	if err != nil {
		return nil, err
	}
	// The type first: a file without it is likely not a rules file at all,
	// and saying so helps more than naming its first unknown key.
	t, ok := keys["type"]
	if !ok {
		return nil, p.errf(root, "type is missing: a rules file declares type: %s", rulesFileType)
	}
	if v, err := p.str(t.value, "type"); err != nil {
		return nil, err
	} else if v != rulesFileType {
		return nil, p.errf(deref(t.value), "type %q: want %s", v, rulesFileType)
	}
	if err := p.known(keys, "name", "type", "rules"); err != nil {
		return nil, err
	}
	rf := &rulesFile{}
	if n, ok := keys["name"]; ok {
		if rf.name, err = p.str(n.value, "name"); err != nil {
			return nil, err
		}
	}
	rn, ok := keys["rules"]
	if !ok {
		return nil, p.errf(root, "rules is missing: want a list of rules")
	}
	list := deref(rn.value)
	if list.Kind != yaml.SequenceNode {
		return nil, p.errf(list, "rules: want a list of rules, got %s", kindName(list))
	}
	if len(list.Content) == 0 {
		return nil, p.errf(list, "rules is empty: want at least one rule")
	}
	// Where each id was first seen, for duplicates.
	lines := make(map[string]int, len(existing)+len(list.Content))
	for _, r := range existing {
		lines[r.ID] = 0
	}
	for i, item := range list.Content {
		r, idNode, err := p.rule(i, deref(item))
		if err != nil {
			return nil, err
		}
		if first, dup := lines[r.ID]; dup {
			p.what = fmt.Sprintf("rule %q: ", r.ID)
			if first == 0 {
				return nil, p.errf(idNode, "id is also the id of one of the handler's own rules: ids must be unique across rules and rules_file")
			}
			return nil, p.errf(idNode, "duplicate id: line %d has it already", first)
		}
		lines[r.ID] = idNode.Line
		rf.rules = append(rf.rules, r)
	}
	return rf, nil
}

// entry is one key of a mapping.
type entry struct {
	key, value *yaml.Node
}

// mapping returns a mapping's entries by key, refusing keys that are not
// plain strings, duplicates and merge keys.
func (p *rulesParser) mapping(n *yaml.Node) (map[string]entry, error) {
	out := make(map[string]entry, len(n.Content)/2)
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := deref(n.Content[i]), n.Content[i+1]
		if k.Kind != yaml.ScalarNode {
			return nil, p.errf(k, "a key must be a plain string, got %s", kindName(k))
		}
		if k.ShortTag() == "!!merge" {
			return nil, p.errf(k, "merge keys (<<) are not supported: write the keys out")
		}
		if prev, dup := out[k.Value]; dup {
			return nil, p.errf(k, "%s given twice: line %d has it already", k.Value, prev.key.Line)
		}
		out[k.Value] = entry{key: k, value: v}
	}
	return out, nil
}

// known refuses the first key, in the file's order, that is not one of
// want.
func (p *rulesParser) known(keys map[string]entry, want ...string) error {
	var first *yaml.Node
	for k, e := range keys {
		if !slices.Contains(want, k) && (first == nil || before(e.key, first)) {
			first = e.key
		}
	}
	if first == nil {
		return nil
	}
	return p.errf(first, "unknown key %q: want %s", first.Value, orList(want))
}

// rule reads the i-th entry of rules. It returns the rule's id node, for
// messages about the id.
func (p *rulesParser) rule(i int, n *yaml.Node) (Rule, *yaml.Node, error) {
	p.what = fmt.Sprintf("rule #%d: ", i+1)
	defer func() { p.what = "" }()
	var r Rule
	if n.Kind != yaml.MappingNode {
		return r, nil, p.errf(n, "want a mapping with id, when, limit_to, unit and rate_limit_applies_per, got %s", kindName(n))
	}
	p.what = ruleWhat(i, n)
	keys, err := p.mapping(n)
	if err != nil {
		return r, nil, err
	}
	// A misspelled key is named before the id is missed: "idd" explains
	// "id is missing".
	if err := p.known(keys, "id", "when", "limit_to", "unit", "rate_limit_applies_per"); err != nil {
		return r, nil, err
	}
	id, ok := keys["id"]
	if !ok {
		return r, nil, p.errf(n, "id is missing")
	}
	if r.ID, err = p.str(id.value, "id"); err != nil {
		return r, nil, err
	}
	idNode := deref(id.value)
	if !validRuleID(r.ID) {
		return r, nil, p.errf(idNode, "id must be 1 to 128 printable ASCII characters without spaces, quotes or backslashes")
	}

	l := Limit{}
	lt, ok := keys["limit_to"]
	if !ok {
		return r, nil, p.errf(n, "limit_to is missing: want a positive whole number")
	}
	if l.LimitTo, err = p.count(deref(lt.value)); err != nil {
		return r, nil, err
	}
	u, ok := keys["unit"]
	if !ok {
		return r, nil, p.errf(n, "unit is missing: want one of %s", unitNames())
	}
	if l.Unit, err = p.str(u.value, "unit"); err != nil {
		return r, nil, err
	}
	spec, ok := units[l.Unit]
	if !ok {
		return r, nil, p.errf(deref(u.value), "unit %q is not one of %s", l.Unit, unitNames())
	}
	if err := (bucket.Limit{Count: l.LimitTo, Window: spec.window}).Validate(); err != nil {
		return r, nil, p.errf(deref(lt.value), "limit_to: %v", err)
	}
	r.Limits = []Limit{l}

	if w, ok := keys["when"]; ok {
		if r.When, err = p.when(deref(w.value)); err != nil {
			return r, nil, err
		}
	}
	if a, ok := keys["rate_limit_applies_per"]; ok {
		seen := map[dimension]bool{}
		err := p.list(deref(a.value), "rate_limit_applies_per", func(v string, vn *yaml.Node) error {
			d, err := parseDimension(v)
			if err != nil {
				return p.errf(vn, "%v", err)
			}
			if seen[d] {
				return p.errf(vn, "rate_limit_applies_per: %q listed twice", v)
			}
			seen[d] = true
			r.AppliesPer = append(r.AppliesPer, v)
			return nil
		})
		if err != nil {
			return r, nil, err
		}
	}
	// Everything above was checked where it was written; the module's own
	// check of the whole rule backs that up, at the rule's line.
	if _, err := compileRule("", r); err != nil {
		return r, nil, p.errf(idNode, "%v", err)
	}
	return r, idNode, nil
}

// ruleWhat names the i-th rule, n, in messages: by its id when it has one.
func ruleWhat(i int, n *yaml.Node) string {
	for j := 0; j+1 < len(n.Content); j += 2 {
		if k, v := deref(n.Content[j]), deref(n.Content[j+1]); k.Value == "id" && v.Kind == yaml.ScalarNode && v.ShortTag() != "!!null" {
			return fmt.Sprintf("rule %q: ", v.Value)
		}
	}
	return fmt.Sprintf("rule #%d: ", i+1)
}

// when reads a rule's when block.
func (p *rulesParser) when(n *yaml.Node) (*When, error) {
	if n.Kind != yaml.MappingNode {
		return nil, p.errf(n, "when: want a mapping with subjects, models and metadata, got %s", kindName(n))
	}
	keys, err := p.mapping(n)
	if err != nil {
		return nil, err
	}
	if err := p.known(keys, "subjects", "models", "metadata"); err != nil {
		return nil, err
	}
	w := &When{}
	if s, ok := keys["subjects"]; ok {
		err := p.list(deref(s.value), "subjects", func(v string, vn *yaml.Node) error {
			// parseSubject's messages never quote the value: a
			// virtualaccount subject may be an API key.
			if _, err := parseSubject(v); err != nil {
				return p.errf(vn, "%v", err)
			}
			w.Subjects = append(w.Subjects, v)
			return nil
		})
		if err != nil {
			return nil, err
		}
		if len(w.Subjects) == 0 {
			// An empty list would be no condition at all: the rule would
			// apply to every caller.
			return nil, p.errf(s.value, "subjects: an empty list would match every caller; leave subjects out to mean that")
		}
	}
	if m, ok := keys["models"]; ok {
		err := p.list(deref(m.value), "models", func(v string, vn *yaml.Node) error {
			if v == "" {
				return p.errf(vn, "models: empty model name")
			}
			w.Models = append(w.Models, v)
			return nil
		})
		if err != nil {
			return nil, err
		}
		if len(w.Models) == 0 {
			return nil, p.errf(m.value, "models: an empty list would match every model; leave models out to mean that")
		}
	}
	if md, ok := keys["metadata"]; ok {
		mn := deref(md.value)
		if mn.Kind != yaml.MappingNode {
			return nil, p.errf(mn, "metadata: want a mapping of keys to values, got %s", kindName(mn))
		}
		// Read in the file's order, so that of two mistakes the first is
		// named.
		if _, err := p.mapping(mn); err != nil {
			return nil, err
		}
		w.Metadata = make(map[string]string, len(mn.Content)/2)
		for i := 0; i+1 < len(mn.Content); i += 2 {
			k := deref(mn.Content[i])
			if k.Value == "" {
				return nil, p.errf(k, "metadata: empty key")
			}
			v, err := p.str(mn.Content[i+1], "metadata."+k.Value)
			if err != nil {
				return nil, err
			}
			w.Metadata[k.Value] = v
		}
	}
	return w, nil
}

// list reads a list of strings. A missing one is refused: "subjects:" with
// nothing after it is more likely a list left out than a rule meant for
// everyone. Callers refuse an empty subjects or models list for the same
// reason (an empty condition matches everything); an empty
// rate_limit_applies_per is one bucket, as it says.
func (p *rulesParser) list(n *yaml.Node, what string, each func(v string, vn *yaml.Node) error) error {
	if n.Kind != yaml.SequenceNode {
		return p.errf(n, "%s: want a list such as [\"a\", \"b\"], got %s", what, kindName(n))
	}
	for _, item := range n.Content {
		v, err := p.str(item, what+" entry")
		if err != nil {
			return err
		}
		if err := each(v, deref(item)); err != nil {
			return err
		}
	}
	return nil
}

// str reads a scalar as the string it was written as: an id or metadata
// value written 42 is "42".
func (p *rulesParser) str(n *yaml.Node, what string) (string, error) {
	n = deref(n)
	if n.Kind != yaml.ScalarNode || n.ShortTag() == "!!null" {
		return "", p.errf(n, "%s: want a string, got %s", what, kindName(n))
	}
	return n.Value, nil
}

// count reads limit_to: a positive whole number, written as one.
func (p *rulesParser) count(n *yaml.Node) (int64, error) {
	if n.Kind != yaml.ScalarNode || n.ShortTag() != "!!int" {
		// YAML reads an integer too large for 64 bits as a float.
		if n.ShortTag() == "!!float" {
			if _, err := strconv.ParseInt(n.Value, 10, 64); errors.Is(err, strconv.ErrRange) {
				return 0, p.errf(n, "limit_to %s is too large", n.Value)
			}
		}
		desc := kindName(n)
		if n.Kind == yaml.ScalarNode && n.ShortTag() != "!!null" {
			desc = strconv.Quote(n.Value)
		}
		return 0, p.errf(n, "limit_to: want a positive whole number, got %s", desc)
	}
	var v int64
	if err := n.Decode(&v); err != nil {
		return 0, p.errf(n, "limit_to %s is too large", n.Value)
	}
	if v <= 0 {
		return 0, p.errf(n, "limit_to must be positive, got %d", v)
	}
	return v, nil
}

// docContent returns a document's top node (an empty document's is a null
// scalar).
func docContent(doc *yaml.Node) *yaml.Node {
	if doc.Kind == yaml.DocumentNode && len(doc.Content) > 0 {
		return deref(doc.Content[0])
	}
	return doc
}

// deref follows an alias (*name) to the node it names. The parser refuses
// aliases of undefined anchors and anchors that contain themselves, and the
// walk descends a fixed number of levels, so aliases cannot make it loop or
// blow up.
func deref(n *yaml.Node) *yaml.Node {
	for i := 0; n.Kind == yaml.AliasNode && n.Alias != nil && i < 8; i++ {
		n = n.Alias
	}
	return n
}

// kindName describes a node for messages.
func kindName(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	case yaml.ScalarNode:
		if n.ShortTag() == "!!null" {
			return "nothing"
		}
		return "a single value"
	}
	return "something else"
}

// before reports whether a comes before b in the file.
func before(a, b *yaml.Node) bool {
	return a.Line < b.Line || a.Line == b.Line && a.Column < b.Column
}

// orList joins words as "a, b or c".
func orList(words []string) string {
	if len(words) < 2 {
		return strings.Join(words, "")
	}
	return strings.Join(words[:len(words)-1], ", ") + " or " + words[len(words)-1]
}
