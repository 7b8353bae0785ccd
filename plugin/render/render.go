package render

import (
	"bytes"
	_ "embed"
	"strconv"
	"strings"
	"text/template"
)

//go:embed haproxy.cfg.tmpl
var cfgTemplate string

//go:embed spoe.conf.tmpl
var spoeTemplate string

var funcs = template.FuncMap{
	"hostport":      hostPort,
	"exposedName":   ExposedName,
	"isHTTP":        IsHTTP,
	"isH2":          IsH2,
	"mode":          Mode,
	"msOr":          msOr,
	"chainFrontend": ChainFrontend,
}

func msOr(ms, def int) int {
	if ms <= 0 {
		return def
	}
	return ms
}

var (
	cfgTmpl  = template.Must(template.New("haproxy.cfg").Funcs(funcs).Parse(cfgTemplate))
	spoeTmpl = template.Must(template.New("spoe.conf").Funcs(funcs).Parse(spoeTemplate))
)

// Output is a rendered configuration.
type Output struct {
	// Config is the complete haproxy.cfg.
	Config string
	// SPOE is the SPOE engine file, to write at Model.SPOEFile.
	SPOE string
	// Shape is Config with every upstream slot's address and state left
	// out: two outputs with the same Shape differ only in what the runtime
	// API can change (set server addr/state), so no reload is needed.
	Shape string
}

// Render validates m and renders it.
func Render(m *Model) (*Output, error) {
	if err := m.Validate(); err != nil {
		return nil, err
	}
	v := newView(m)
	cfg, err := execute(cfgTmpl, v, false)
	if err != nil {
		return nil, err
	}
	shape, err := execute(cfgTmpl, v, true)
	if err != nil {
		return nil, err
	}
	spoe, err := execute(spoeTmpl, v, false)
	if err != nil {
		return nil, err
	}
	return &Output{Config: cfg, SPOE: spoe, Shape: shape}, nil
}

func execute(t *template.Template, v view, shape bool) (string, error) {
	var b bytes.Buffer
	v.Shape = shape
	err := t.Execute(&b, &v)
	return strings.TrimLeft(b.String(), "\n"), err
}

// view is what the templates read: the model, whether the output is
// the Shape, the layout of the callers' entries (telemetry and rate
// limits) and the rate limits' rules.
type view struct {
	*Model
	Shape     bool
	Telemetry telemetry
	Callers   callers
	Rate      rateView
}

func newView(m *Model) view {
	// Thread sums need sc1, which instance and route rate limits hold.
	tel := newTelemetry(m.AdminBind, m.LatencyMapFile, m.AdminBind != "" && IsHTTP(m.Inbound.Protocol) && !scopedLimits(m))
	c, r := newRates(m, tel)
	return view{Model: m, Telemetry: tel, Callers: c, Rate: r}
}

// ServerName is the configuration name of an upstream's slot.
func ServerName(i int) string { return "s" + strconv.Itoa(i+1) }
